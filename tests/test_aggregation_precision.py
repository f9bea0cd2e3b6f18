"""Precision of aggregation in every float dtype (issue 13, item 3), by property tests.

* Unanimous coordinates (every update with the same non-zero sign) have agreement exactly 1 and
  hard mask 1 at τ = 1, whatever the weights and the dtype (float16, bfloat16, float32, float64).
* Results, returned in the updates' dtype, are close to a float64 reference computed on the same
  (already rounded) inputs. Tolerance, with M = max |Δ| and K clients:
  ``atol = 2 ε(dtype) M + 4 K ε(acc) M``, where ε is the machine epsilon and acc the accumulation
  dtype (float32 for 16-bit updates): one rounding of the result to its dtype, plus the running
  sums' roundings (each of the K terms and additions, relative to M since Σ p_k = 1).
* Realistic sample counts work in 16-bit: 4 clients x 20,000 examples in float16 (Σ n = 80,000 >
  65,504, float16's largest value).
Thresholds used against the reference are chosen away from every c/K with K ≤ 8, so a comparison
A ≥ τ is decided the same way in float32 and float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgma.aggregation import GMAAggregator, MeanAggregator, accumulation_dtype, gma, mean

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

weights_st = st.one_of(
    st.lists(st.floats(0.01, 1e6), min_size=1, max_size=8),
    st.lists(st.integers(1, 10**7).map(float), min_size=1, max_size=8),  # sample counts, sums past 2^24
)


def _updates(data, dtype: torch.dtype, k: int, d: int) -> list[torch.Tensor]:
    values = st.floats(-100.0, 100.0, allow_nan=False, width=16)
    return [torch.tensor(data.draw(st.lists(values, min_size=d, max_size=d)), dtype=torch.float64).to(dtype)
            for _ in range(k)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["count", "weighted"])
@PROPERTY
@given(weights=weights_st, data=st.data())
def test_unanimous_coordinates_have_agreement_exactly_one(dtype, weighted, weights, data) -> None:
    d = 6
    magnitudes = _updates(data, dtype, len(weights), d)
    signs = torch.tensor([1, -1, 1, -1, 1, 1], dtype=dtype)  # the same sign on every client, per coordinate
    updates = [(u.abs() + torch.tensor(0.5, dtype=dtype)) * signs for u in magnitudes]
    aggregator = GMAAggregator(threshold=1.0, hard=True, weighted_agreement=weighted)
    for u, w in zip(updates, weights, strict=True):
        aggregator.add(u, w)
    assert aggregator.agreement().tolist() == [1.0] * d
    aggregate, stats = aggregator.result()
    assert stats["mask"].tolist() == [1.0] * d and stats["mask"].dtype == dtype
    assert aggregate.dtype == dtype
    _, mask = gma(updates, weights, threshold=1.0, hard=True, weighted_agreement=weighted)
    assert mask.tolist() == [1.0] * d


def test_the_reported_cases_give_agreement_one() -> None:
    """Two clients of weights 5.2 and 2.2 with one sign (was 0.99999994, hard mask 0 at τ = 1); counts past 2^24."""
    for weights in ([5.2, 2.2], [2.0**24 - 1, 3.0, 7.0]):
        updates = [torch.tensor([0.5, -1.0, 2.0])] * len(weights)
        aggregator = GMAAggregator(threshold=1.0, hard=True, weighted_agreement=True)
        for u, w in zip(updates, weights, strict=True):
            aggregator.add(u, w)
        assert aggregator.agreement().tolist() == [1.0, 1.0, 1.0]
        assert gma(updates, weights, threshold=1.0, hard=True, weighted_agreement=True)[1].tolist() == [1.0] * 3


def _reference(updates: list[torch.Tensor], weights: list[float], threshold: float) -> tuple[torch.Tensor, ...]:
    """GMA (count agreement, soft mask) in float64 on the same rounded inputs."""
    x = torch.stack([u.double() for u in updates])
    w = torch.tensor(weights, dtype=torch.float64)
    average = (w[:, None] * x).sum(0) / w.sum()
    agreement = x.sign().sum(0).abs() / len(updates)
    mask = torch.where(agreement >= threshold, 1.0, agreement)
    return average * mask, average


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@PROPERTY
@given(weights=weights_st, threshold=st.sampled_from([0.0, 0.3, 0.55, 0.93, 1.0]), data=st.data())
def test_results_are_close_to_a_float64_reference(dtype, weights, threshold, data) -> None:
    k, d = len(weights), 5
    updates = _updates(data, dtype, k, d)
    expected, expected_mean = _reference(updates, weights, threshold)
    scale = max(float(u.double().abs().max()) for u in updates)
    atol = 2 * torch.finfo(dtype).eps * scale + 4 * k * torch.finfo(accumulation_dtype(dtype)).eps * scale
    aggregate, mask = gma(updates, weights, threshold=threshold)
    assert aggregate.dtype == mask.dtype == dtype
    torch.testing.assert_close(aggregate.double(), expected, rtol=0, atol=atol)
    streaming = GMAAggregator(threshold=threshold)
    averaging = MeanAggregator()
    for u, w in zip(updates, weights, strict=True):
        streaming.add(u, w)
        averaging.add(u, w)
    assert torch.equal(streaming.result()[0], aggregate)  # streaming and one-shot: the same bits
    average = mean(updates, weights)
    assert average.dtype == dtype and torch.equal(averaging.result()[0], average)
    torch.testing.assert_close(average.double(), expected_mean, rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_updates_aggregate_with_realistic_sample_counts(dtype) -> None:
    """4 clients x 20,000 examples: Σ n = 80,000 exceeds float16's range; summed in float32 it works."""
    updates = [torch.full((3,), 0.25 * (k + 1), dtype=dtype) for k in range(4)]
    average = mean(updates, [20_000] * 4)
    assert average.dtype == dtype and average.tolist() == [0.625] * 3
    aggregate, mask = gma(updates, [20_000] * 4, threshold=0.4, weighted_agreement=True)
    assert aggregate.tolist() == [0.625] * 3 and mask.tolist() == [1.0] * 3


def test_accumulation_dtype() -> None:
    assert [accumulation_dtype(t) for t in DTYPES] == [torch.float32, torch.float32, torch.float32, torch.float64]


def test_statistics_are_the_bits_of_the_float_formulas() -> None:
    """mask_pass_fraction counts without a float copy; it must equal float((A >= τ).float().mean()) exactly."""
    generator = torch.Generator().manual_seed(1)
    updates = [torch.randn(300_001, generator=generator) for _ in range(7)]
    aggregator = GMAAggregator(threshold=0.4)
    for k, u in enumerate(updates):
        aggregator.add(u, 3 + k)
    agreement = aggregator.agreement()
    _, stats = aggregator.result()
    assert stats["mask_pass_fraction"] == float((agreement >= 0.4).float().mean())
    assert stats["agreement_mean"] == float(agreement.mean())
    assert stats["mask_density"] == float(torch.where(agreement < 0.4, agreement, 1.0).mean())
