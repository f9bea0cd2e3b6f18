"""The README's quick start: its command, run as written, gives the accuracies the README states."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from fedgma.cli import main

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow  # about 25 s on 2 cores
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_quick_start_gives_the_accuracies_the_readme_states(tmp_path, monkeypatch) -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"\.venv/bin/fedgma (sweep [^\n`]*--out runs/quickstart)", readme)
    assert command, "the quick start's fedgma sweep command is not in the README"
    stated = re.search(r"end at ([\d.]+)%\s+\(mean\) and ([\d.]+)% \(GMA\) test accuracy in the final round, and "
                       r"average ([\d.]+)% and ([\d.]+)% over the last\s+20% of rounds", readme)
    assert stated, "the quick start's accuracies are not in the README"
    final_mean, final_gma, last_mean, last_gma = map(float, stated.groups())

    monkeypatch.chdir(ROOT)  # the command names configs/quickstart.toml relative to the checkout
    args = shlex.split(command.group(1).replace("runs/quickstart", str(tmp_path / "quickstart")))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summaries = {s.parent.name: json.loads(s.read_text()) for s in (tmp_path / "quickstart").glob("*/summary.json")}
    mean, gma = summaries["aggregator=mean_seed0"], summaries["aggregator=gma_seed0"]
    assert 100 * mean["final"]["test_accuracy"] == pytest.approx(final_mean, abs=0.006)
    assert 100 * gma["final"]["test_accuracy"] == pytest.approx(final_gma, abs=0.006)
    assert 100 * mean["last_20pct"]["test_accuracy"] == pytest.approx(last_mean, abs=0.006)
    assert 100 * gma["last_20pct"]["test_accuracy"] == pytest.approx(last_gma, abs=0.006)
