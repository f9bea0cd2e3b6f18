"""Robust aggregation rules (median, trimmed mean, norm clipping) and the per-reply validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedgma.aggregation import available_aggregators, make_aggregator
from fedgma.config import ConfigError, load_config
from fedgma.robust import (
    MedianAggregator,
    NormClipping,
    TrimmedMeanAggregator,
    clip_to_norm,
    update_problem,
    with_clipping,
)


def fold(aggregator, updates, weights=None):
    for k, u in enumerate(updates):
        aggregator.add(u, 1.0 if weights is None else weights[k])
    return aggregator.result()


def test_robust_rules_are_registered_and_configurable():
    assert {"mean", "gma", "median", "trimmed_mean"} <= set(available_aggregators())
    assert load_config(None, ["server.aggregator=median"]).server.aggregator.name == "median"
    config = load_config(None, ["server.aggregator=trimmed_mean", "server.aggregator.trim_fraction=0.2"])
    aggregator = make_aggregator(config.server.aggregator.name, **config.server.aggregator.options)
    assert isinstance(aggregator, TrimmedMeanAggregator) and aggregator.trim_fraction == 0.2
    with pytest.raises(ConfigError, match="server.aggregator.*trim_fraction"):
        load_config(None, ["server.aggregator=trimmed_mean", "server.aggregator.trim_fraction=0.5"])
    with pytest.raises(ConfigError, match="aggregator 'gma' has no option 'trim_fraction'"):
        load_config(None, ["server.aggregator=gma", "server.aggregator.trim_fraction=0.2"])


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_median_matches_numpy(k):
    g = torch.Generator().manual_seed(k)
    updates = [torch.randn(50, generator=g) for _ in range(k)]
    result, info = fold(MedianAggregator(), updates, weights=[float(i + 1) for i in range(k)])  # weights ignored
    expected = np.median(torch.stack(updates).numpy(), axis=0)
    np.testing.assert_allclose(result.numpy(), expected, rtol=0, atol=1e-7)
    assert info["num_clients"] == k


@pytest.mark.parametrize(("k", "beta"), [(5, 0.1), (5, 0.2), (10, 0.2), (10, 0.45), (7, 0.0)])
def test_trimmed_mean_matches_scipy(k, beta):
    g = torch.Generator().manual_seed(10 * k)
    updates = [torch.randn(40, generator=g, dtype=torch.float64) for _ in range(k)]
    result, info = fold(TrimmedMeanAggregator(beta), updates)
    expected = stats.trim_mean(torch.stack(updates).numpy(), beta, axis=0)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-12, atol=1e-12)
    assert info["trimmed_per_side"] == int(np.floor(beta * k))


def test_trim_fraction_is_checked():
    for bad in (-0.1, 0.5, float("nan")):
        with pytest.raises(ValueError, match="trim_fraction must lie in"):
            TrimmedMeanAggregator(bad)


def test_median_and_trimmed_mean_ignore_a_minority_of_huge_outliers():
    """With 2 of 10 clients sending 1e6, the robust rules stay inside the honest values' range."""
    g = torch.Generator().manual_seed(0)
    honest = [torch.rand(30, generator=g) for _ in range(8)]
    attackers = [torch.full((30,), 1e6), torch.full((30,), 1e6)]
    low, high = torch.stack(honest).min(0).values, torch.stack(honest).max(0).values
    for aggregator in (MedianAggregator(), TrimmedMeanAggregator(0.2)):
        result, _ = fold(aggregator, honest + attackers)
        assert bool(((result >= low) & (result <= high)).all()), aggregator.name
    mean_result, _ = fold(make_aggregator("mean"), honest + attackers)
    assert float(mean_result.abs().max()) > 1  # the plain mean is dragged away


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(0, 4),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31),
)
def test_median_is_bounded_by_honest_values_when_attackers_are_a_minority(honest_count, attacker_count, scale, seed):
    """Coordinate-wise median: if attackers < honest, every coordinate lies within the honest range."""
    if attacker_count >= honest_count:
        attacker_count = honest_count - 1
    g = torch.Generator().manual_seed(seed)
    honest = [torch.randn(12, generator=g, dtype=torch.float64) for _ in range(honest_count)]
    attackers = [torch.randn(12, generator=g, dtype=torch.float64) * scale * 1e6 for _ in range(attacker_count)]
    result, _ = fold(MedianAggregator(), honest + attackers)
    stacked = torch.stack(honest)
    assert bool((result >= stacked.min(0).values).all() and (result <= stacked.max(0).values).all())


def test_updates_are_copied_so_a_reused_buffer_does_not_corrupt_the_result():
    buffer = torch.ones(4)
    aggregator = MedianAggregator()
    aggregator.add(buffer)
    buffer.fill_(100.0)
    aggregator.add(buffer)
    aggregator.add(torch.ones(4))
    assert torch.equal(aggregator.result()[0], torch.ones(4))


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_robust_rules_reject_bad_input_naming_the_client(name):
    aggregator = make_aggregator(name)
    aggregator.add(torch.zeros(3))
    with pytest.raises(ValueError, match="client 1: update contains NaN"):
        aggregator.add(torch.tensor([0.0, float("nan"), 0.0]))
    with pytest.raises(ValueError, match=r"client 1: update has shape \(4,\)"):
        aggregator.add(torch.zeros(4))
    with pytest.raises(ValueError, match="client 1: weight must be a finite non-negative"):
        aggregator.add(torch.zeros(3), -1.0)
    with pytest.raises(ValueError, match="no client update was added"):
        make_aggregator(name).result()


# --------------------------------------------------------------------------------------------
# Norm clipping
# --------------------------------------------------------------------------------------------


def test_clip_to_norm_keeps_direction_and_caps_norm():
    u = torch.tensor([3.0, 4.0])
    assert torch.allclose(clip_to_norm(u, 1.0), torch.tensor([0.6, 0.8]))
    assert clip_to_norm(u, 5.0) is u  # within the bound: unchanged, not copied


@pytest.mark.parametrize("name", ["mean", "gma", "median", "trimmed_mean"])
def test_clipping_composes_with_every_rule(name):
    g = torch.Generator().manual_seed(1)
    updates = [torch.randn(20, generator=g) * (10 if k == 0 else 1) for k in range(5)]
    clipped, stats_ = fold(NormClipping(make_aggregator(name), 2.0), updates)
    reference, _ = fold(make_aggregator(name), [clip_to_norm(u, 2.0) for u in updates])
    assert torch.allclose(clipped, reference)
    norms = [float(u.norm()) for u in updates]
    assert stats_["clipped_fraction"] == sum(n > 2.0 for n in norms) / 5
    # A bound above every norm changes nothing; with_clipping(None) is the rule itself.
    loose, _ = fold(with_clipping(make_aggregator(name), max(norms) + 1), updates)
    plain, _ = fold(make_aggregator(name), updates)
    assert torch.equal(loose, plain)
    bare = make_aggregator(name)
    assert with_clipping(bare, None) is bare


def test_clipping_bounds_the_mean_under_a_scaling_attack():
    honest = [torch.full((10,), 0.1) for _ in range(8)]
    attackers = [torch.full((10,), 100.0) for _ in range(2)]
    result, _ = fold(NormClipping(make_aggregator("mean"), 1.0), honest + attackers)
    assert float(result.norm()) <= 1.0 + 1e-6


def test_clipping_passes_nan_on_so_the_rule_rejects_it():
    aggregator = NormClipping(make_aggregator("mean"), 1.0)
    with pytest.raises(ValueError, match="client 0: update contains NaN"):
        aggregator.add(torch.tensor([float("nan"), 1.0]))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
            NormClipping(make_aggregator("mean"), bad)


# --------------------------------------------------------------------------------------------
# Validation of one reply
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "max_norm", "message"),
    [
        (torch.zeros(5), None, None),
        (torch.full((5,), 1.0), 10.0, None),
        ([0.0] * 5, None, "sent a list, not a tensor"),
        (torch.zeros(4), None, r"shape \(4,\), expected \(5,\)"),
        (torch.zeros(5, 1), None, r"shape \(5, 1\), expected \(5,\)"),
        (torch.zeros(5, dtype=torch.int64), None, "dtype torch.int64"),
        (torch.tensor([0.0, float("nan"), float("inf"), 0.0, 0.0]), None, "2 NaN/infinite value"),
        (torch.full((5,), 10.0), 1.0, r"norm 22.36 > server.max_update_norm = 1"),
    ],
)
def test_update_problem_names_what_is_wrong(update, max_norm, message):
    problem = update_problem(update, 5, max_norm)
    if message is None:
        assert problem is None
    else:
        assert problem is not None
        import re

        assert re.search(message, problem), problem
