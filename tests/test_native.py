"""The opt-in compiled aggregation kernel (FEDGMA_NATIVE=1): same bits as the PyTorch path, a clean fallback
without it, and off by default."""

from __future__ import annotations

import contextlib

import pytest
import torch

from fedgma import native
from fedgma.aggregation import GMAAggregator, MeanAggregator, gma, mean

with native.enabled():
    needs_kernel = pytest.mark.skipif(native.fold_kernel() is None,
                                      reason=f"no compiled kernel: {native.native_status()}")


@pytest.fixture(autouse=True)
def opted_in(monkeypatch):
    """Every test here runs with the kernel opted in (FEDGMA_NATIVE=1) unless it says otherwise."""
    monkeypatch.setenv("FEDGMA_NATIVE", "1")


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A native module that has not tried to build yet, with its cache in tmp_path."""
    monkeypatch.setenv("FEDGMA_CACHE_DIR", str(tmp_path / "cache"))
    native._reset_for_tests()
    yield native
    native._reset_for_tests()


def _updates(k: int, d: int, seed: int) -> tuple[list[torch.Tensor], list[float]]:
    generator = torch.Generator().manual_seed(seed)
    updates = [torch.randn(d, generator=generator) * 10 ** float(torch.randint(-4, 3, (1,), generator=generator))
               for _ in range(k)]
    updates[0][: d // 4] = 0.0  # sign(0) = 0
    if k > 1:
        updates[1][: d // 5] = -0.0
        updates[-1][d // 2 :] = updates[0][d // 2 :]  # exact ties in sign
    weights = [float(torch.randint(1, 1000, (1,), generator=generator)) for _ in range(k)]
    return updates, weights


@needs_kernel
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("d", [1, 7, 16385, 600_001])  # the last spans blocks and both threads
@pytest.mark.parametrize("weighted_agreement", [False, True])
def test_kernel_gives_the_same_bits_as_pytorch(k, d, weighted_agreement):
    updates, weights = _updates(k, d, seed=k * 1000 + d)
    fast_aggregate, fast_mask = gma(updates, weights, 0.4, weighted_agreement=weighted_agreement)
    fast_mean = mean(updates, weights)
    with native.disabled():
        slow_aggregate, slow_mask = gma(updates, weights, 0.4, weighted_agreement=weighted_agreement)
        slow_mean = mean(updates, weights)
    assert torch.equal(fast_aggregate, slow_aggregate)
    assert torch.equal(fast_mask, slow_mask)
    assert torch.equal(fast_mean, slow_mean)


@needs_kernel
def test_streaming_aggregators_use_the_kernel_and_agree():
    updates, weights = _updates(6, 100_003, seed=3)
    results = []
    for off in (False, True):
        gma_stream, mean_stream = GMAAggregator(0.3), MeanAggregator()
        with native.disabled() if off else contextlib.nullcontext():
            for u, w in zip(updates, weights, strict=True):
                gma_stream.add(u, w)
                mean_stream.add(u, w)
            results.append((gma_stream.result()[0], mean_stream.average()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][0], gma(updates, weights, 0.3)[0])  # streaming = one-shot


@needs_kernel
def test_kernel_is_cached_and_reused(fresh_native):
    first = fresh_native.fold_kernel()
    assert first is not None and first.path.parent == fresh_native.cache_dir()
    built = first.path.stat().st_mtime_ns
    fresh_native._reset_for_tests()
    second = fresh_native.fold_kernel()
    assert second is not None and second.path == first.path
    assert second.path.stat().st_mtime_ns == built  # loaded from the cache, not rebuilt
    assert "compiled kernel" in fresh_native.native_status()


def test_without_a_compiler_aggregation_falls_back_to_pytorch(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert fresh_native.fold_kernel() is None
    assert "no C compiler" in fresh_native.native_status()
    updates, weights = _updates(5, 1000, seed=5)
    aggregate, mask = gma(updates, weights, 0.4)
    with native.disabled():
        assert torch.equal(aggregate, gma(updates, weights, 0.4)[0])
    assert mask.shape == (1000,)


def test_a_compiler_error_falls_back_with_the_reason(fresh_native, monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(fresh_native, "SOURCE", broken)
    if fresh_native.shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    assert fresh_native.fold_kernel() is None
    assert "unavailable" in fresh_native.native_status()


@pytest.mark.parametrize("value", ["0", "off", "false", "", None])
def test_the_kernel_is_off_unless_opted_in(fresh_native, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("FEDGMA_NATIVE")
    else:
        monkeypatch.setenv("FEDGMA_NATIVE", value)
    assert fresh_native.fold_kernel() is None
    assert "opt in with FEDGMA_NATIVE=1" in fresh_native.native_status()
    with fresh_native.enabled():
        assert fresh_native.fold_kernel() is not None or "unavailable" in fresh_native.native_status()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_and_strided_updates_take_the_pytorch_path(dtype):
    updates, weights = _updates(4, 301, seed=9)
    typed = [u.to(dtype) for u in updates]
    aggregate, _ = gma(typed, weights, 0.4)
    with native.disabled():
        assert torch.equal(aggregate, gma(typed, weights, 0.4)[0])
    stacked = torch.stack(updates, dim=1).T  # rows of a transposed matrix: not contiguous
    assert not stacked[0].is_contiguous()
    strided, _ = gma(stacked, weights, 0.4)
    with native.disabled():
        assert torch.equal(strided, gma(stacked, weights, 0.4)[0])
