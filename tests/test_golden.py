"""No number changes: short runs of every recipe x {mean, gma} reproduce the stored metrics bit for bit.

The fixtures were written by ``tests/fixtures/make_golden.py`` before the core redesign; a change that
alters these numbers on purpose regenerates them and says why in its commit message.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures.make_golden import AGGREGATORS, FMNIST_DIR, GOLDEN, RECIPES, SETTINGS, key, run_one

EXPECTED = json.loads(Path(GOLDEN).read_text())
CASES = [(s, r, a) for s in SETTINGS for r in RECIPES for a in AGGREGATORS]


def test_fixture_covers_every_case():
    assert sorted(EXPECTED) == sorted(key(*case) for case in CASES)


@pytest.mark.parametrize(("setting", "recipe", "aggregator"), CASES, ids=[key(*c) for c in CASES])
def test_metrics_are_bit_identical_to_the_fixture(tmp_path, setting, recipe, aggregator):
    if setting == "fmnist" and not FMNIST_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    assert run_one(setting, recipe, aggregator, tmp_path) == EXPECTED[key(setting, recipe, aggregator)]
