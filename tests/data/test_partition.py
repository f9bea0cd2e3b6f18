"""Property tests for the partitioners: exact cover, minimum sizes, seed determinism, measurable skew."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedgma.data import partition as P

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

labels_strategy = st.integers(1, 10).flatmap(
    lambda c: st.lists(st.integers(0, c - 1), min_size=20, max_size=400).map(lambda v: np.asarray(v, dtype=np.int64))
)
seeds = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=40, deadline=None)


def balanced_labels(n: int = 5000, classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, classes, n)


def assert_cover(parts, n):
    P.check_partition(parts, n)
    for part in parts:
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0), "each client's indices are sorted"


# ---------------------------------------------------------------- exact cover and minimum sizes


@FAST
@given(n=st.integers(0, 500), clients=st.integers(1, 30), seed=seeds)
def test_iid_cover(n, clients, seed):
    parts = P.iid(n, clients, seed)
    assert len(parts) == clients
    if n:
        assert_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@FAST
@given(
    labels=labels_strategy,
    clients=st.integers(1, 20),
    alpha=st.floats(0.01, 100),
    min_size=st.integers(0, 3),
    seed=seeds,
)
def test_dirichlet_cover_and_min(labels, clients, alpha, min_size, seed):
    if clients * min_size > len(labels):
        with pytest.raises(ValueError, match="min_size"):
            P.dirichlet(labels, clients, alpha, seed, min_size)
        return
    parts = P.dirichlet(labels, clients, alpha, seed, min_size)
    assert len(parts) == clients
    assert_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size


@FAST
@given(labels=labels_strategy, clients=st.integers(1, 30), k=st.integers(1, 10), seed=seeds)
def test_shards_cover_and_k_classes(labels, clients, k, seed):
    num_classes = len(np.unique(labels))
    if k > num_classes or clients * k < num_classes:
        with pytest.raises(ValueError, match="classes_per_client"):
            P.shards(labels, clients, k, seed)
        return
    counts = np.unique(labels, return_counts=True)[1]
    try:
        parts = P.shards(labels, clients, k, seed)
    except ValueError as error:  # a class smaller than its holders (at least ⌊clients·k / classes⌋ of them)
        assert str(error).startswith("shards: class ") and "lower num_clients or classes_per_client" in str(error)
        assert counts.min() < -(-clients * k // num_classes)
        return
    assert_cover(parts, len(labels))
    assert [len(np.unique(labels[part])) for part in parts] == [k] * clients  # exactly k, never empty


def test_shards_refuses_long_tailed_labels_naming_the_class():
    labels = np.repeat(np.arange(4), [500, 300, 200, 3])  # class 3: 3 records for 5 holders (20 clients × 1 / 4)
    with pytest.raises(ValueError) as error:
        P.shards(labels, 20, 1, seed=0)
    assert str(error.value) == (
        "shards: class 3 has 3 record(s) but 5 of the 20 clients must hold it (classes_per_client=1), so some "
        "would get fewer than 1 classes or no data; lower num_clients or classes_per_client, or use a dirichlet "
        "partition for long-tailed labels"
    )
    assert "min_size" not in str(error.value)


def test_shards_exactly_k_when_classes_are_large():
    labels = balanced_labels(6000)
    parts = P.shards(labels, 50, 2, seed=3)
    assert [len(np.unique(labels[p])) for p in parts] == [2] * 50
    # every class held by 10 clients (50 clients × 2 classes / 10 classes)
    holders = np.bincount(np.concatenate([np.unique(labels[p]) for p in parts]), minlength=10)
    assert holders.tolist() == [10] * 10


@FAST
@given(
    n=st.integers(10, 600),
    clients=st.integers(1, 40),
    use_beta=st.booleans(),
    spread=st.floats(0.05, 5),
    min_size=st.integers(0, 5),
    seed=seeds,
)
def test_quantity_cover_and_min(n, clients, use_beta, spread, min_size, seed):
    kwargs = {"beta": spread} if use_beta else {"sigma": spread}
    if clients * min_size > n:
        with pytest.raises(ValueError, match="min_size"):
            P.quantity(n, clients, seed, min_size=min_size, **kwargs)
        return
    parts = P.quantity(n, clients, seed, min_size=min_size, **kwargs)
    assert len(parts) == clients
    assert_cover(parts, n)
    assert min(len(p) for p in parts) >= min_size


@FAST
@given(
    labels=labels_strategy,
    clients=st.integers(1, 20),
    alpha=st.floats(0.01, 50),
    use_beta=st.booleans(),
    min_size=st.integers(0, 3),
    seed=seeds,
)
def test_quantity_label_skew_cover_and_min(labels, clients, alpha, use_beta, min_size, seed):
    kwargs = {"beta": 0.5} if use_beta else {"sigma": 1.0}
    if clients * min_size > len(labels):
        return
    parts = P.quantity_label_skew(labels, clients, alpha, seed, min_size=min_size, **kwargs)
    assert len(parts) == clients
    assert_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size


@FAST
@given(ids=st.lists(st.sampled_from(["a", "b", "c", "zed"]), min_size=1, max_size=100))
def test_natural_groups_by_id(ids):
    parts, unique = P.natural(ids)
    assert unique.tolist() == sorted(set(ids))
    assert_cover(parts, len(ids))
    for part, uid in zip(parts, unique, strict=False):
        assert all(ids[i] == uid for i in part)


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize(
    "make",
    [
        lambda labels, s: P.iid(len(labels), 10, s),
        lambda labels, s: P.dirichlet(labels, 10, 0.3, s, min_size=5),
        lambda labels, s: P.shards(labels, 10, 2, s),
        lambda labels, s: P.quantity(len(labels), 10, s, beta=0.5),
        lambda labels, s: P.quantity(len(labels), 10, s, sigma=1.0),
        lambda labels, s: P.quantity_label_skew(labels, 10, 0.3, s, sigma=1.0, min_size=5),
    ],
    ids=["iid", "dirichlet", "shards", "quantity-beta", "quantity-sigma", "quantity-label"],
)
def test_seed_determinism(make):
    labels = balanced_labels(2000)
    a, b, c = make(labels, 7), make(labels, 7), make(labels, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=False))
    # a SeedSequence works as a seed and is deterministic too
    d, e = make(labels, np.random.SeedSequence(7)), make(labels, np.random.SeedSequence(7))
    assert all(np.array_equal(x, y) for x, y in zip(d, e, strict=False))


# ---------------------------------------------------------------- the intended skew is present


def test_dirichlet_entropy_falls_with_alpha():
    labels = balanced_labels(10000)
    entropy = [
        np.mean([P.partition_stats(labels, P.dirichlet(labels, 20, a, s), 10).mean_entropy for s in range(3)])
        for a in (100.0, 1.0, 0.1, 0.01)
    ]
    assert entropy[0] > 0.95 * np.log(10)
    assert all(x > y for x, y in zip(entropy, entropy[1:], strict=False)), entropy


def test_shards_entropy_bounded_by_k():
    labels = balanced_labels(10000)
    stats = P.partition_stats(labels, P.shards(labels, 20, 2, 0), 10)
    assert stats.mean_entropy <= np.log(2) + 1e-9
    assert (stats.label_counts > 0).sum(axis=1).max() == 2


@pytest.mark.parametrize("kind", ["beta", "sigma"])
def test_quantity_size_spread_rises_with_skew(kind):
    values = (100.0, 1.0, 0.1) if kind == "beta" else (0.05, 0.5, 2.0)
    cvs = [
        np.mean(
            [P.partition_stats(np.zeros(20000, int), P.quantity(20000, 50, s, **{kind: v})).size_cv for s in range(3)]
        )
        for v in values
    ]
    assert all(x < y for x, y in zip(cvs, cvs[1:], strict=False)), cvs
    # labels stay IID under pure quantity skew: large clients see every class
    labels = balanced_labels(20000)
    parts = P.quantity(20000, 10, 0, **{kind: values[0]})
    assert P.partition_stats(labels, parts, 10).mean_entropy > 0.98 * np.log(10)


def test_quantity_label_skew_has_both_skews():
    labels = balanced_labels(20000)
    mixed = P.partition_stats(labels, P.quantity_label_skew(labels, 30, 0.1, 0, beta=0.5), 10)
    iid = P.partition_stats(labels, P.iid(20000, 30, 0), 10)
    assert mixed.mean_entropy < 0.7 * iid.mean_entropy
    assert mixed.size_cv > 0.5 > iid.size_cv
    # sizes track the quantity model's targets (same seed, same size draw) to within the number of classes
    target = np.array([len(p) for p in P.quantity(20000, 30, 0, beta=0.5)])
    got = np.array([len(p) for p in P.quantity_label_skew(labels, 30, 0.1, 0, beta=0.5)])
    assert np.abs(got - target).max() < 10
    skewed = P.quantity_label_skew(labels, 30, 100.0, 0, beta=0.5)
    assert P.partition_stats(labels, skewed, 10).mean_entropy > 0.9 * np.log(10)


def test_partition_stats_values():
    labels = np.array([0, 0, 1, 1, 2, 2])
    stats = P.partition_stats(labels, [np.array([0, 1]), np.array([2, 4]), np.array([3, 5])], num_classes=4)
    assert stats.sizes.tolist() == [2, 2, 2]
    assert stats.label_counts.tolist() == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0]]
    assert stats.entropies == pytest.approx([0, np.log(2), np.log(2)])
    assert stats.size_cv == 0.0
    assert stats.as_dict()["num_clients"] == 3


# ---------------------------------------------------------------- bad arguments name the argument


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: P.iid(10, 0), "num_clients"),
        (lambda: P.iid(10, 2, seed=-1), "seed"),
        (lambda: P.dirichlet(np.zeros(10, int), 2, 0.0), "alpha"),
        (lambda: P.dirichlet(np.zeros(10, int), 2, float("nan")), "alpha"),
        (lambda: P.dirichlet(np.zeros((2, 5), int), 2, 1.0), "labels"),
        (lambda: P.dirichlet(np.array([0.5, 1.0]), 2, 1.0), "labels must be integers"),
        (lambda: P.dirichlet(np.array([0.0, 1e30]), 2, 1.0), "labels must be integers within int64"),
        (lambda: P.dirichlet(np.zeros(10, int), 2, 1.0, min_size=6), "min_size"),
        (lambda: P.dirichlet(np.zeros(10, int), 2, 1.0, min_size=-1), "min_size"),
        (lambda: P.shards(np.arange(10), 2, 2), "classes_per_client"),
        (lambda: P.shards(np.arange(10), 20, 11), "classes_per_client"),
        (lambda: P.quantity(10, 2), "exactly one of beta"),
        (lambda: P.quantity(10, 2, beta=1.0, sigma=1.0), "exactly one of beta"),
        (lambda: P.quantity(10, 2, beta=-1.0), "beta"),
        (lambda: P.quantity(10, 2, sigma=0.0), "sigma"),
        (lambda: P.quantity_label_skew(np.zeros(10, int), 2, -1.0, beta=1.0), "alpha"),
        (lambda: P.natural([]), "client_ids"),
        (lambda: P.check_partition([np.array([0, 1]), np.array([1, 2])], 3), "more than one client"),
        (lambda: P.check_partition([np.array([0, 1])], 3), "no client"),
        (lambda: P.partition_stats(np.array([0, 3]), [np.array([0, 1])], num_classes=2), "num_classes"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- scale, on the real labels


@pytest.mark.skipif(not (FASHION_DIR / "train-labels-idx1-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_dirichlet_1000_clients_fashion_mnist_is_fast():
    from fedgma.data.idx import read_idx

    labels = read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz").astype(np.int64)
    start = time.perf_counter()
    parts = P.dirichlet(labels, 1000, 0.05, seed=0, min_size=10)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0
    assert_cover(parts, 60000)
    assert min(len(p) for p in parts) >= 10
    stats = P.partition_stats(labels, parts, 10)
    assert stats.mean_entropy < 0.5 * np.log(10)


# ---------------------------------------------------------------- the min_size top-up


def test_top_up_takes_in_proportion_to_surplus():
    owner = np.repeat([3, 4], [45, 44])  # clients 0, 1, 2 empty; 3 and 4 hold 45 and 44
    new = P.top_up(owner, 10, seed=0, num_clients=5)
    assert np.bincount(new, minlength=5).tolist() == [10, 10, 10, 30, 29]  # not 10, 10, 10, 15, 44


sizes_strategy = st.lists(st.integers(0, 60), min_size=1, max_size=25)


@FAST
@given(sizes=sizes_strategy, classes=st.integers(1, 6), min_size=st.integers(0, 12), seed=seeds)
def test_top_up_properties(sizes, classes, min_size, seed):
    sizes = np.asarray(sizes)
    n, clients = int(sizes.sum()), len(sizes)
    rng = np.random.default_rng(seed)
    owner = rng.permutation(np.repeat(np.arange(clients), sizes))
    labels = rng.integers(0, classes, n)
    if clients * min_size > n:
        with pytest.raises(ValueError, match="min_size"):
            P.top_up(owner, min_size, seed, labels, clients)
        return
    new = P.top_up(owner, min_size, seed, labels, clients)
    assert new.shape == owner.shape and new.dtype == np.int64
    assert np.array_equal(owner, P.top_up(owner, 0, seed, labels, clients))  # min_size 0: nothing moves
    after = np.bincount(new, minlength=clients)
    assert after.sum() == n and after.min() >= min_size  # exact cover, every client ≥ min_size
    for i in range(clients):
        if sizes[i] <= min_size:  # receivers and clients at min_size keep their own records, and reach exactly min
            assert np.all(new[owner == i] == i)
            assert after[i] == max(min_size, sizes[i])
        else:  # donors only give, never below min_size, and in proportion to their surplus (±1)
            assert np.all(owner[new == i] == i)
            assert min_size <= after[i] <= sizes[i]
    bigger = sizes[:, None] > sizes[None, :]
    assert np.all((after[:, None] >= after[None, :])[bigger])  # the size ranking is kept
    deficit = int(np.maximum(min_size - sizes, 0).sum())
    surplus = np.maximum(sizes - min_size, 0)
    if deficit:
        exact = min_size + surplus * (1 - deficit / surplus.sum())
        donors = sizes > min_size
        assert np.all(np.abs(after[donors] - exact[donors]) < 2)
        for i in np.flatnonzero(donors):  # a donor's label mix is kept: each class in proportion (±1)
            before_c = np.bincount(labels[owner == i], minlength=classes)
            after_c = np.bincount(labels[new == i], minlength=classes)
            assert np.all(np.abs(after_c - before_c * after[i] / sizes[i]) < 1 + 1e-9)


def test_top_up_keeps_receivers_classes():
    labels = np.repeat([0, 2, 1, 2, 1], [20, 20, 40, 2, 6])
    owner = np.repeat([2, 3, 0, 1], [40, 40, 2, 6])  # receiver 0 holds class 2, receiver 1 class 1
    new = P.top_up(owner, 10, seed=0, labels=labels, num_clients=4)
    # deficit 8 + 4 taken 6 and 6; donor 2 gives 3 of class 0 and 3 of class 2, donor 3 six of class 1
    assert np.bincount(new, minlength=4).tolist() == [10, 10, 34, 34]
    assert np.bincount(labels[new == 2], minlength=3).tolist() == [17, 0, 17]  # donor's mix kept
    assert np.bincount(labels[new == 1], minlength=3).tolist() == [0, 10, 0]  # receivers take their own class first
    assert np.bincount(labels[new == 0], minlength=3)[2] == 5


def test_dirichlet_top_up_at_1000_clients_leaves_the_largest_large():
    """Issue 13: at 1,000 clients, α = 0.05 on long-tailed labels the 40 largest clients all ended at 10."""
    rng = np.random.default_rng(0)
    labels = np.minimum(rng.zipf(1.5, 60_000) - 1, 99)
    before = np.asarray([len(p) for p in P.dirichlet(labels, 1000, 0.05, seed=1, min_size=0)])  # same draws
    after = np.asarray([len(p) for p in P.dirichlet(labels, 1000, 0.05, seed=1, min_size=10)])
    deficit = int(np.maximum(10 - before, 0).sum())
    surplus = np.maximum(before - 10, 0)
    donors = before > 10
    assert deficit > 0 and after.min() == 10
    exact = 10 + surplus * (1 - deficit / surplus.sum())
    assert np.all(np.abs(after[donors] - exact[donors]) < 1)
    assert np.argmax(after) == np.argmax(before) and np.sort(after)[-40:].min() > 10
