"""Fuzzing (hypothesis): the config loader, partitioners and aggregators on random and hostile input.

Each call must either work (and then its result must be sound) or raise our clear error type
(``ConfigError`` for configs, ``ValueError`` for the rest; ``ConfigError`` is a ``ValueError``): never a
TypeError, KeyError, IndexError, ZeroDivisionError or a crash deep inside numpy or torch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fedgma.aggregation import available_aggregators, make_aggregator
from fedgma.config import Config, ConfigError, apply_overrides, load_config, parse_config, resolve
from fedgma.data import partition
from fedgma.robust import NormClipping

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

hostile_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "nan", "-1", "1e400", "gma", "mean", "median", "fedavg", "scaffold", "cpu", "digits"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

KEYS = {
    "": ["name", "seed", "rounds", "eval_every", "algorithm", "device", "backend", "threads", "checkpoint_every",
         "bogus"],
    "data": ["dataset", "partition", "alpha", "num_clients", "min_size", "bogus"],
    "client": ["local_epochs", "local_steps", "batch_size", "lr", "momentum", "prox_mu", "bogus"],
    "server": ["aggregator", "threshold", "lr", "clients_per_round", "trim_fraction", "clip_norm",
               "max_update_norm", "on_bad_update", "min_clients", "bogus"],
    "faults": ["crash", "straggle", "nan", "sign_flip", "scale", "scale_factor", "label_flip", "bogus"],
}


@st.composite
def raw_configs(draw):
    raw = {}
    for section, keys in KEYS.items():
        chosen = draw(st.lists(st.sampled_from(keys), max_size=4, unique=True))
        values = {key: draw(hostile_scalars) for key in chosen}
        if section:
            raw[section] = draw(st.one_of(st.just(values), hostile_scalars)) if values else values
        else:
            raw.update(values)
    return raw


@FUZZ
@given(raw_configs())
def test_config_loader_accepts_or_names_the_problem(raw):
    try:
        config = resolve(parse_config(raw))
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        assert "config key" in str(error) or "unknown config key" in str(error)
        return
    assert isinstance(config, Config)
    assert config.rounds >= 1 and config.server.clients_per_round <= config.data.num_clients


@FUZZ
@given(st.lists(st.text(max_size=30), max_size=4))
def test_overrides_accept_or_raise_config_error(overrides):
    try:
        raw = apply_overrides({}, overrides)
        resolve(parse_config(raw))
    except ConfigError as error:
        assert str(error)


@FUZZ
@given(st.text(max_size=200))
def test_any_toml_text_loads_or_raises_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_text(text)
    try:
        load_config(path)
    except ConfigError as error:
        assert str(error)


def test_overrides_into_a_non_table_are_refused():
    with pytest.raises(ConfigError, match="config key 'server' must be a table"):
        apply_overrides({"server": 3}, ["server.lr=1"])


# --------------------------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------------------------

# Hostile integers: negative, zero, large. (Non-integers — None, str, inf, 1e300, 2.0 — must be rejected
# with a ValueError too: see test_partitioners_reject_wrong_types_with_value_error.)
# Rates (alpha, beta) get NaN/inf/negative floats.
sizes = st.one_of(st.integers(-5, 300), st.sampled_from([0, 1, -(10**9)]))
small_counts = st.integers(-3, 60)
positive_reals = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 5))
labels_arrays = st.one_of(
    st.lists(st.integers(0, 9), max_size=200).map(np.array),
    st.lists(st.integers(-3, 3), max_size=50).map(np.array),
    st.lists(st.floats(allow_nan=True), max_size=20).map(np.array),
    st.just(np.zeros((3, 2), dtype=np.int64)),
    st.just(np.array([], dtype=np.int64)),
)


def check_sound(parts, num_samples):
    partition.check_partition(parts, num_samples)  # every record exactly once


def guarded(call):
    try:
        return call()
    except ValueError as error:
        assert str(error)
        return None


@FUZZ
@given(sizes, small_counts, st.integers(0, 2**32))
def test_iid_partition(num_samples, num_clients, seed):
    parts = guarded(lambda: partition.iid(num_samples, num_clients, seed))
    if parts is not None:
        assert len(parts) == num_clients
        if num_samples:
            check_sound(parts, num_samples)


@FUZZ
@given(labels_arrays, small_counts, positive_reals, st.integers(0, 2**32), st.integers(-1, 5))
def test_dirichlet_partition(labels, num_clients, alpha, seed, min_size):
    assume(not (isinstance(num_clients, int) and num_clients > 10**4))  # a valid but slow request
    parts = guarded(lambda: partition.dirichlet(labels, num_clients, alpha, seed, min_size))
    if parts is not None:
        assert len(parts) == num_clients
        if len(labels):
            check_sound(parts, len(labels))
            assert min(len(p) for p in parts) >= max(min_size, 0)


@FUZZ
@given(labels_arrays, small_counts, small_counts, st.integers(0, 2**32))
def test_shards_partition(labels, num_clients, classes_per_client, seed):
    assume(not (isinstance(num_clients, int) and num_clients > 10**4))
    parts = guarded(lambda: partition.shards(labels, num_clients, classes_per_client, seed))
    if parts is not None and len(labels):
        check_sound(parts, len(labels))


@FUZZ
@given(sizes, small_counts, positive_reals, st.integers(-1, 3))
def test_quantity_partition(num_samples, num_clients, beta, min_size):
    assume(not (isinstance(num_clients, int) and num_clients > 10**4))
    parts = guarded(lambda: partition.quantity(num_samples, num_clients, 0, beta=beta, min_size=min_size))
    if parts is not None and num_samples:
        check_sound(parts, num_samples)


@pytest.mark.parametrize(("num_samples", "num_clients"),
                         [(None, 3), (10, 2.0), (float("inf"), 1), (0, float("inf")), (0, 1e300)])
def test_partitioners_reject_wrong_types_with_value_error(num_samples, num_clients):
    with pytest.raises(ValueError):
        partition.iid(num_samples, num_clients, 0)


# --------------------------------------------------------------------------------------------
# Aggregators (every registered rule, with and without norm clipping)
# --------------------------------------------------------------------------------------------

entries = st.one_of(st.floats(-1e6, 1e6, width=32), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
updates = st.one_of(
    st.lists(st.floats(-1e6, 1e6, width=32), min_size=1, max_size=8).map(lambda v: torch.tensor(v)),
    st.lists(entries, min_size=1, max_size=8).map(lambda v: torch.tensor(v)),
    st.integers(1, 8).map(lambda n: torch.zeros(n, 2)),  # wrong rank
    st.integers(1, 8).map(lambda n: torch.zeros(n, dtype=torch.int64)),  # wrong dtype
    st.just([1.0, 2.0]),  # not a tensor
)
weights = st.one_of(st.just(0.0), st.floats(1e-6, 1e6), st.floats(allow_nan=True, allow_infinity=True),
                    st.integers(-3, 100), st.text(max_size=3), st.none())


@FUZZ
@given(
    st.sampled_from(sorted(set(available_aggregators()) | {"mean", "gma", "median", "trimmed_mean"})),
    st.lists(st.tuples(updates, weights), max_size=8),
    st.one_of(st.none(), st.floats(1e-3, 1e3)),
)
def test_aggregators_work_or_raise_value_error(name, replies, clip):
    aggregator = make_aggregator(name)
    if clip is not None:
        aggregator = NormClipping(aggregator, clip)
    admitted = []
    for update, weight in replies:
        try:
            aggregator.add(update, weight)
        except ValueError as error:
            assert "client" in str(error)
            continue
        admitted.append(update)
    try:
        result, stats = aggregator.result()
    except ValueError as error:
        assert "cannot aggregate" in str(error)
        return
    assert isinstance(result, torch.Tensor) and torch.isfinite(result).all()
    assert result.shape == admitted[0].shape
    # Every rule's output lies within the per-coordinate range of what it was given, or 0 (GMA's mask).
    bound = torch.stack([u.abs() for u in admitted]).max(0).values
    if clip is not None:
        bound = torch.clamp(bound, max=clip)
    assert bool((result.abs() <= bound * (1 + 1e-5) + 1e-6).all())
    assert stats.get("num_clients", len(admitted)) == len(admitted)


@pytest.mark.parametrize("name", ["mean", "gma"])
def test_a_tiny_positive_weight_gives_a_finite_result_or_an_error(name):
    aggregator = make_aggregator(name)
    try:
        aggregator.add(torch.zeros(3), 1e-60)
        result, _ = aggregator.result()
    except ValueError:
        return
    assert bool(torch.isfinite(result).all())


@FUZZ
@given(st.lists(st.floats(0, 1e3, allow_subnormal=False), min_size=1, max_size=6))
def test_trim_fraction_and_clip_norm_values(values):
    for beta in values:
        try:
            aggregator = make_aggregator("trimmed_mean", trim_fraction=beta / 1e3)
        except ValueError as error:
            assert "trim_fraction" in str(error)
        else:
            assert 0 <= aggregator.trim_fraction < 0.5
    for c in values:
        if c > 0 and math.isfinite(c):
            assert NormClipping(make_aggregator("mean"), c).max_norm == c
