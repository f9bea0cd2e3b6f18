"""fedgma.accumulator: the running sums every streaming rule builds on.

``fold_into`` must give the bits of the plain per-client loop whatever its chunk size and thread count (every
operation is element-wise), and ``Accumulator`` must refuse bad updates and weights naming the client.
"""

from __future__ import annotations

import pytest
import torch

from fedgma import accumulator
from fedgma.accumulator import Accumulator, accumulation_dtype, all_finite, check_weight, fold_into, update_rows


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """The PyTorch path (the compiled kernel, opt-in, has its own tests in test_native.py)."""
    monkeypatch.setenv("FEDGMA_NATIVE", "0")


def _reference(updates, weights, sign_weights, dtype):
    total = torch.zeros_like(updates[0], dtype=dtype)
    signs = torch.zeros_like(updates[0], dtype=dtype)
    for update, w, sw in zip(updates, weights, sign_weights, strict=True):
        total.add_(update.to(dtype), alpha=w)
        signs.add_(torch.sign(update).to(dtype), alpha=sw)
    return total, signs


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 16])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fold_gives_the_plain_loops_bits_for_any_chunk_and_thread_count(monkeypatch, chunk, threads, dtype):
    generator = torch.Generator().manual_seed(chunk + threads)
    d = 70_001  # not a multiple of any chunk; with CHUNK = 7 (below) every thread gets several runs
    updates = [(torch.randn(d, generator=generator) * 3).to(dtype) for _ in range(5)]
    updates[2][:100] = 0.0  # sign(0) = 0
    weights, sign_weights = [3.0, 1.0, 0.5, 7.0, 2.0], [1.0, 2.0, 0.5, 1.0, 3.0]  # sign weights: not all 1
    monkeypatch.setattr(accumulator, "TORCH_CHUNK", chunk)
    monkeypatch.setattr(accumulator, "CHUNK", max(chunk, 7))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wide = accumulation_dtype(dtype)
        total, signs = torch.zeros(d, dtype=wide), torch.zeros(d, dtype=wide)
        fold_into(total, signs, updates, weights, sign_weights)
        only_sum = torch.zeros(d, dtype=wide)
        fold_into(only_sum, None, updates, weights, sign_weights)
    finally:
        torch.set_num_threads(previous)
    expected_total, expected_signs = _reference(updates, weights, sign_weights, wide)
    assert torch.equal(total, expected_total)
    assert torch.equal(signs, expected_signs)
    assert torch.equal(only_sum, expected_total)


def test_accumulation_dtype_widens_only_16_bit_floats():
    assert accumulation_dtype(torch.float16) == torch.float32
    assert accumulation_dtype(torch.bfloat16) == torch.float32
    assert accumulation_dtype(torch.float32) == torch.float32
    assert accumulation_dtype(torch.float64) == torch.float64


def test_all_finite_finds_bad_entries_and_finite_overflowing_sums():
    assert all_finite(torch.ones(10))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([1.0, float("-inf")]))
    big = torch.full((4,), torch.finfo(torch.float32).max)
    assert all_finite(big)  # the sum overflows, the entries do not


@pytest.mark.parametrize(("update", "weight", "message"), [
    ([1.0, 2.0], 1.0, "client 1: update must be a torch.Tensor, got list"),
    (torch.ones(2, 2), 1.0, r"client 1: update must be a 1-D tensor \(flat parameter vector\), got shape \(2, 2\)"),
    (torch.ones(3, dtype=torch.long), 1.0, "client 1: update must be a floating-point tensor, got torch.int64"),
    (torch.ones(4), 1.0, r"client 1: update has shape \(4,\), expected \(3,\) like client 0"),
    (torch.ones(3, dtype=torch.float64), 1.0, "client 1: update has dtype torch.float64, expected torch.float32"),
    (torch.tensor([1.0, float("nan"), 0.0]), 1.0, "client 1: update contains NaN or infinite values"),
    (torch.ones(3), -1.0, "client 1: weight must be a finite non-negative number, got -1.0"),
    (torch.ones(3), "x", "client 1: weight 'x' is not a number"),
])
def test_the_second_clients_bad_update_or_weight_is_refused_by_index(update, weight, message):
    acc = Accumulator()
    assert acc._admit(torch.ones(3), 2.0) == 2.0
    with pytest.raises(ValueError, match=f"^{message}$"):
        acc._admit(update, weight)
    assert (acc.count, acc.total_weight) == (1, 2.0)  # the refused update left no trace


def test_an_empty_or_weightless_round_is_refused():
    with pytest.raises(ValueError, match="no client update was added"):
        Accumulator()._check_ready()
    acc = Accumulator()
    acc._admit(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="the client weights sum to zero"):
        acc._check_ready()


def test_check_finite_false_admits_non_finite_updates():
    acc = Accumulator(check_finite=False)
    acc._admit(torch.tensor([float("inf")]), 1.0)
    assert acc.count == 1


def test_check_weight_accepts_numbers_only():
    assert check_weight(3, 0) == 3.0
    with pytest.raises(ValueError, match="client 4: weight must be a finite non-negative number, got inf"):
        check_weight(float("inf"), 4)


def test_update_rows_takes_a_matrix_or_a_sequence():
    matrix = torch.arange(6.0).reshape(2, 3)
    assert [row.tolist() for row in update_rows(matrix)] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    rows = [torch.ones(2), torch.zeros(2)]
    assert update_rows(rows) is rows
    with pytest.raises(ValueError, match=r"got a tensor of shape \(6,\)"):
        update_rows(torch.arange(6.0))
    with pytest.raises(ValueError, match="got str"):
        update_rows("updates")


def test_the_old_private_name_still_works_for_rules_written_against_it():
    from fedgma.aggregation import _Accumulator

    assert _Accumulator is Accumulator
