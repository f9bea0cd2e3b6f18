"""GMA and mean against a direct float64 reference formula, plus exact properties and bad inputs."""

from __future__ import annotations

import contextlib

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from fedgma.aggregation import (
    GMAAggregator,
    Layer,
    MeanAggregator,
    available_aggregators,
    gma,
    make_aggregator,
    mean,
)


def reference_gma(updates: np.ndarray, weights: np.ndarray | None, threshold: float, hard: bool,
                  weighted_agreement: bool) -> tuple[np.ndarray, np.ndarray]:
    """The paper's formula, written out directly in float64."""
    k = updates.shape[0]
    w = np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)
    p = w / w.sum()
    average = (p[:, None] * updates).sum(0)
    signs = np.sign(updates)
    agreement = np.abs((p[:, None] * signs).sum(0)) if weighted_agreement else np.abs(signs.mean(0))
    mask = np.where(agreement >= threshold, 1.0, 0.0 if hard else agreement)
    return mask * average, mask


def random_updates(rng: np.random.Generator, k: int, d: int) -> np.ndarray:
    """Updates with exact zeros and ties, so sign(0) = 0 and A at the threshold are exercised."""
    values = rng.choice([-1.0, -0.5, 0.0, 0.0, 0.25, 1.0, 2.0], size=(k, d))
    return values * rng.choice([1.0, 1.5], size=(k, d))


@pytest.mark.parametrize("threshold", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("weighted_agreement", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
@pytest.mark.parametrize("use_weights", [False, True])
def test_gma_matches_reference(threshold, hard, weighted_agreement, as_list, use_weights):
    rng = np.random.default_rng(7)
    updates = random_updates(rng, 10, 500)
    weights = rng.integers(1, 50, size=10).astype(float) if use_weights else None
    expected, expected_mask = reference_gma(updates, weights, threshold, hard, weighted_agreement)
    tensor = torch.tensor(updates, dtype=torch.float32)
    arg = list(tensor.unbind(0)) if as_list else tensor
    result, mask = gma(arg, None if weights is None else list(weights), threshold, hard, weighted_agreement)
    np.testing.assert_allclose(mask.numpy(), expected_mask, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_agreement_at_threshold_counts_as_passing():
    # 3 of 5 positive, 2 negative: A = |3 - 2| / 5 = 0.2 exactly; at τ = 0.2 the mask must be 1.
    updates = torch.tensor([[1.0], [1.0], [1.0], [-1.0], [-1.0]])
    assert gma(updates, threshold=0.2)[1].item() == 1.0
    assert gma(updates, threshold=0.21)[1].item() == pytest.approx(0.2)
    assert gma(updates, threshold=0.21, hard=True)[1].item() == 0.0


def test_zero_updates_count_as_no_vote():
    # sign(0) = 0: one client +, one client 0 → A = 1/2, not 1.
    _, mask = gma(torch.tensor([[2.0], [0.0]]), threshold=0.9)
    assert mask.item() == 0.5


@given(
    k=st.integers(1, 8),
    d=st.integers(1, 40),
    seed=st.integers(0, 2**31),
    weighted=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_threshold_zero_is_mean_bit_for_bit(k, d, seed, weighted):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(k, d, generator=g)
    weights = (torch.rand(k, generator=g) * 100 + 1).tolist() if weighted else None
    masked, mask = gma(updates, weights, threshold=0.0)
    assert torch.equal(mask, torch.ones(d))
    assert torch.equal(masked, mean(updates, weights))


def test_threshold_one_hard_keeps_only_unanimous_coordinates():
    updates = torch.tensor([[1.0, 1.0, -1.0], [2.0, -1.0, -3.0], [0.5, 1.0, -0.1]])
    result, mask = gma(updates, threshold=1.0, hard=True)
    assert mask.tolist() == [1.0, 0.0, 1.0]
    assert result[1].item() == 0.0
    assert result[0].item() == pytest.approx(3.5 / 3)


def test_streaming_equals_one_shot_and_matches_mean():
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(100, generator=g) for _ in range(6)]
    weights = [3, 1, 4, 1, 5, 9]
    streaming = GMAAggregator(threshold=0.4)
    plain = MeanAggregator()
    for u, w in zip(updates, weights, strict=True):
        streaming.add(u, w)
        plain.add(u, w)
    result, stats = streaming.result()
    one_shot, mask = gma(updates, weights, threshold=0.4)
    assert torch.equal(result, one_shot)
    assert torch.equal(stats["mask"], mask)
    assert torch.equal(plain.result()[0], mean(updates, weights))


def test_statistics_are_consistent_with_the_mask():
    updates = torch.tensor([[1.0, -1.0, 1.0, 1.0], [1.0, 1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]])
    aggregator = GMAAggregator(threshold=0.5, layers=[Layer("a", 0, 1), Layer("b", 1, 3)])
    for u in updates:
        aggregator.add(u, 1.0)
    _, stats = aggregator.result()
    # agreement: [1, 1/3, 1/3, 1/3] → mask [1, 1/3, 1/3, 1/3]
    assert stats["mask_pass_fraction"] == pytest.approx(0.25)
    assert stats["mask_density"] == pytest.approx((1 + 1 / 3 * 3) / 4)
    assert stats["agreement_mean"] == pytest.approx(0.5)
    assert stats["mask_density/a"] == pytest.approx(1.0)
    assert stats["mask_density/b"] == pytest.approx(1 / 3)
    assert stats["agreement_histogram"] == [0, 0, 0, 3, 0, 0, 0, 0, 0, 1]
    assert sum(stats["agreement_histogram/b"]) == 3


@pytest.mark.parametrize(
    ("updates", "weights", "kwargs", "message"),
    [
        ([], None, {}, "no client update"),
        ([torch.zeros(3), torch.zeros(4)], None, {}, "client 1: update has shape (4,), expected (3,)"),
        ([torch.zeros(3), torch.tensor([0.0, float("nan"), 1.0])], None, {}, "client 1: update contains NaN"),
        ([torch.zeros(3), torch.tensor([0.0, float("inf"), 1.0])], None, {}, "client 1: update contains NaN or inf"),
        ([torch.ones(3), torch.ones(3)], [1.0, -2.0], {}, "client 1: weight must be a finite non-negative"),
        ([torch.ones(3), torch.ones(3)], [0.0, 0.0], {}, "weights sum to zero"),
        ([torch.ones(3)], None, {"threshold": 1.5}, "threshold must lie in [0, 1]"),
        ([torch.ones(3)], None, {"threshold": -0.1}, "threshold must lie in [0, 1]"),
        ([torch.ones(3)], [1.0, 2.0], {}, "got 1 updates but 2 weights"),
        (torch.ones(3), None, {}, "2-D tensor"),
        ([torch.ones(2, 2)], None, {}, "client 0: update must be a 1-D tensor"),
        ([torch.ones(3, dtype=torch.int64)], None, {}, "client 0: update must be a floating-point tensor"),
    ],
)
def test_bad_inputs_are_rejected_with_clear_messages(updates, weights, kwargs, message):
    with pytest.raises(ValueError) as error:
        gma(updates, weights, **kwargs)
    assert message in str(error.value)


def test_mean_rejects_the_same_bad_inputs():
    with pytest.raises(ValueError, match="client 2: update contains NaN"):
        mean([torch.ones(2), torch.ones(2), torch.tensor([1.0, float("nan")])])


def test_every_rule_is_registered_after_import_and_options_are_checked():
    assert {"mean", "gma", "median", "trimmed_mean"} <= set(available_aggregators())
    with pytest.raises(ValueError, match="unknown aggregator 'avg'"):
        make_aggregator("avg")
    with pytest.raises(ValueError, match="aggregator 'mean' has no option 'treshold'; it takes: no options"):
        make_aggregator("mean", treshold=0.9)
    with pytest.raises(ValueError, match=r"aggregator 'gma' has no option 'treshold' \(did you mean 'threshold'\?\)"):
        make_aggregator("gma", treshold=0.9)
    with pytest.raises(ValueError, match="aggregator 'gma' option 'threshold'"):
        make_aggregator("gma", threshold=1.5)


@pytest.mark.parametrize("native_off", [False, True])
def test_weights_beyond_the_update_precision_are_rejected_not_turned_into_nan(native_off):
    """Found by the fuzz test: a finite double weight above float32's max became inf (NaN result on the
    compiled path, a RuntimeError on the PyTorch path). Now a clear ValueError on both."""
    from fedgma import native

    with native.disabled() if native_off else contextlib.nullcontext():
        aggregator = GMAAggregator()
        too_large = r"client 0: weight 3.4028235677973366e\+38 is too large for torch.float32"
        with pytest.raises(ValueError, match=too_large):
            aggregator.add(torch.tensor([0.0]), 3.4028235677973366e38)
        with pytest.raises(ValueError, match="client 0: weight .* too large"):
            gma([torch.tensor([1.0])], [1e39])
        big = torch.finfo(torch.float32).max  # each weight fits, their sum does not
        with pytest.raises(ValueError, match="cannot aggregate: the client weights sum to .* too large"):
            mean([torch.tensor([1e-30]), torch.tensor([1e-30])], [big, big])
        with pytest.raises(ValueError, match="cannot aggregate: the weighted sum of the updates overflowed"):
            gma([torch.tensor([1e30]), torch.tensor([1e30])], [1e20, 1e20])
        stream = MeanAggregator()
        stream.add(torch.tensor([3e38]), 1.0)
        stream.add(torch.tensor([3e38]), 1.0)
        with pytest.raises(ValueError, match="overflowed torch.float32"):
            stream.average()
