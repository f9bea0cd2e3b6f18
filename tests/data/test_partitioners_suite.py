"""One suite for every registered partitioner (declearn's shared plugin suites are the model).

Parametrised over ``PARTITIONERS.names()``, so a newly registered partitioner is tested without
editing any list: its parts cover the training records exactly once, are sorted int64 arrays, one
per client; the same seed gives the same parts; a different seed gives different parts (unless the
partitioner is listed in ``SEED_FREE``); an unknown option is refused naming the partitioner. A
partitioner whose defaults do not validate needs an entry in ``EXAMPLES``, and the suite says so.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.partition import check_partition
from fedgma.registry import PARTITIONERS

NAMES = PARTITIONERS.names()
CLIENTS = 5

#: Options for partitioners whose defaults alone are not a valid choice.
EXAMPLES = {"quantity": {"beta": 0.5}, "quantity-label": {"sigma": 1.0}}
#: Partitioners whose parts are fixed by the data, not drawn (the seed must not matter).
SEED_FREE = {"natural"}


def splits() -> DatasetSplits:
    """300 records of 10 unbalanced classes, with one of ``CLIENTS`` natural client ids each."""
    rng = np.random.default_rng(0)
    y = rng.choice(10, size=300, p=np.linspace(1, 3, 10) / np.linspace(1, 3, 10).sum())
    x = torch.from_numpy(rng.standard_normal((300, 4)).astype(np.float32))
    ids = np.repeat([f"c{i}" for i in range(CLIENTS)], 60)
    rng.shuffle(ids)
    data = ArrayDataset(x, torch.from_numpy(y.astype(np.int64)))
    return DatasetSplits("generated", data, data.subset(np.arange(10)), 10, train_client_ids=ids)


def options(name: str) -> dict:
    try:
        PARTITIONERS.validate(name, {})
    except ValueError as error:
        if name not in EXAMPLES:
            pytest.fail(f"partitioner {name!r} has no valid defaults ({error}); add an example to EXAMPLES")
    return EXAMPLES.get(name, {})


def parts_of(name: str, seed: int) -> list[np.ndarray]:
    partitioner = PARTITIONERS.build(name, options(name))
    return partitioner(splits(), CLIENTS, np.random.SeedSequence(seed))


def test_the_registry_holds_the_built_in_partitioners():
    assert {"iid", "dirichlet", "shards", "quantity", "quantity-label", "natural"} <= set(NAMES)
    assert set(EXAMPLES) | SEED_FREE <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_parts_cover_every_record_exactly_once(name):
    parts = parts_of(name, 0)
    assert len(parts) == CLIENTS
    check_partition(parts, 300)
    assert sum(len(p) for p in parts) == 300
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1
        assert np.array_equal(part, np.sort(part))


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_parts(name):
    a, b = parts_of(name, 7), parts_of(name, 7)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_a_different_seed_gives_different_parts_unless_seed_free(name):
    base = parts_of(name, 0)
    differs = [not all(np.array_equal(p, q) for p, q in zip(base, parts_of(name, s), strict=True)) for s in (1, 2, 3)]
    if name in SEED_FREE:
        assert not any(differs)
    else:
        assert all(differs)


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_refused_naming_the_partitioner(name):
    with pytest.raises(ValueError, match=rf"partitioner '{name}' has no option 'no_such_option'; it takes: "):
        PARTITIONERS.validate(name, {**options(name), "no_such_option": 1})


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("dirichlet", {"alpha": 0.0}, "option 'alpha': Input should be greater than 0"),
        ("dirichlet", {"alpha": float("inf")}, "option 'alpha': Input should be a finite number"),
        ("dirichlet", {"alpha": float("nan")}, "option 'alpha': Input should be a finite number"),
        ("dirichlet", {"min_size": -1}, "option 'min_size': Input should be greater than or equal to 0"),
        ("shards", {"classes_per_client": 0}, "option 'classes_per_client': .*greater than or equal to 1"),
        ("shards", {"classes_per_client": 1.5}, "option 'classes_per_client': Input should be a valid integer"),
        ("quantity", {}, "option 'sigma': give exactly one of beta .* got beta=None, sigma=None"),
        ("quantity", {"beta": 0.5, "sigma": 1.0}, "option 'sigma': give exactly one .* beta=0.5, sigma=1.0"),
        ("quantity", {"beta": -1.0}, "option 'beta': Input should be greater than 0"),
        ("quantity-label", {"alpha": 1.0}, "option 'sigma': give exactly one of beta"),
        ("quantity-label", {"alpha": -1.0, "beta": 1.0}, "option 'alpha': Input should be greater than 0"),
        ("iid", {"alpha": 0.5}, "has no option 'alpha'; it takes: no options"),
        ("natural", {"min_size": 1}, "has no option 'min_size'; it takes: no options"),
    ],
)
def test_options_out_of_bounds_are_one_line_naming_the_option(name, bad, message):
    with pytest.raises(ValueError, match=rf"^partitioner '{name}' .*{message}"):
        PARTITIONERS.validate(name, bad)


def test_defaults_are_filled_in():
    assert PARTITIONERS.validate("dirichlet", {}).model_dump() == {"alpha": 0.5, "min_size": 10}
    assert PARTITIONERS.validate("quantity", {"sigma": 2}).model_dump() == {"beta": None, "sigma": 2.0, "min_size": 10}
