"""The running sums every streaming aggregation rule is built on.

An aggregation rule (:mod:`fedgma.aggregation`, :mod:`fedgma.robust`, :mod:`fedgma.krum`,
:mod:`fedgma.ablations`) folds one client's update Δ_k (a 1-D float tensor [d]) in at a time.
This module holds what they share:

* :class:`Accumulator`, the bookkeeping of a streaming rule: it admits an update (1-D, floating point,
  the first update's shape and dtype, finite, a finite non-negative weight; each refusal is a
  ``ValueError`` naming the client's index), counts clients and weights, and refuses an empty round
  or a total weight that is zero or out of the accumulation dtype's range;
* :func:`fold_into`, the fast path of ``Σ_k w_k Δ_k`` and ``Σ_k s_k sign(Δ_k)``: chunked so each
  chunk of an update is read from memory once, split over a small thread pool, and on float32 CPU
  tensors the compiled kernel of :mod:`fedgma.native` (the same element-wise operations, the same bits);
* :func:`accumulation_dtype` (float32 for 16-bit updates) and :func:`update_rows` (a [K, d] tensor or a
  sequence of K 1-D tensors, as K rows).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .native import FoldKernel, fold_kernel

__all__ = ["Accumulator", "Updates", "accumulation_dtype", "all_finite", "check_weight", "fold_into", "update_rows"]


def check_weight(weight: float, index: int) -> float:
    """``weight`` as a float, for client ``index``.

    Raises:
        ValueError: naming client ``index``, if ``weight`` is not a number or not finite and non-negative.
    """
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"client {index}: weight {weight!r} is not a number") from None
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"client {index}: weight must be a finite non-negative number, got {weight!r}")
    return w


# Updates are folded in over chunks of the flat vector: each chunk of an update is read from memory
# once and its weighted add and sign add then run on the cached chunk, and the sign of a chunk goes
# to a chunk-sized scratch buffer instead of a d-sized one. Every operation is element-wise, so the
# result depends neither on the chunk size nor on the thread count: the streaming and list forms
# (the same per-element operations in the same client order) give bit-identical numbers. On the
# PyTorch path a chunk is TORCH_CHUNK elements (the chunk's sums and scratch, 3 x 256 KiB at 2^16,
# stay in the core's L2 cache); larger chunks fall out of L2, smaller ones pay PyTorch's per-call
# overhead (3 calls per client and chunk). That is with one intra-op thread; with several, the
# vector is split into contiguous runs, one per thread of a small pool, each folded in chunks of
# CHUNK = ATen's grain size, so that every operation stays on its pool thread (see _torch_fold).
# Float32 CPU updates take the compiled kernel of fedgma.native instead when it is enabled: the same
# element-wise operations (same bits) in one loop, four clients per sweep over a cached block, over
# the same runs.
CHUNK = 32768
TORCH_CHUNK = 1 << 16
_MIN_CHUNKS_PER_THREAD = 8
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < threads:  # noqa: SLF001
            _POOL = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fedgma-aggregation")
        return _POOL


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the running sums of updates of ``dtype`` are kept in: float32 for 16-bit floats, else ``dtype``."""
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def all_finite(update: Tensor) -> bool:
    """Whether every entry is finite: one reduction, no d-sized temporary (exact check only if the sum is not)."""
    total = float(update.sum())
    if math.isfinite(total):
        return True  # a NaN or ±inf entry always makes the sum non-finite
    return bool(torch.isfinite(update).all())  # the sum may have overflowed from finite entries


def fold_into(
    weighted_sum: Tensor,
    sign_sum: Tensor | None,
    updates: Sequence[Tensor],
    weights: Sequence[float],
    sign_weights: Sequence[float],
) -> None:
    """``weighted_sum += Σ_k w_k Δ_k`` and ``sign_sum += Σ_k s_k sign(Δ_k)``, chunk by chunk.

    The sums may have a wider dtype than the updates (the accumulation dtype); each term is then
    formed in the sums' dtype.

    Float32 CPU tensors go to the compiled kernel (``fedgma.native``) when it is available: the
    same element-wise operations in the same order, so the same bits, in one pass.
    """
    numel = weighted_sum.numel()
    kernel = _native_kernel(weighted_sum, sign_sum, updates)
    if kernel is None:
        _torch_fold(weighted_sum, sign_sum, updates, weights, sign_weights)
        return
    starts = list(range(0, numel, CHUNK))
    native_fold = kernel.prepare(updates, weights, sign_weights)

    def run(first: int, last: int) -> None:
        native_fold(weighted_sum, sign_sum, starts[first] if first < len(starts) else numel,
                    starts[last] if last < len(starts) else numel)

    threads = min(torch.get_num_threads(), len(starts) // _MIN_CHUNKS_PER_THREAD)
    if threads <= 1:
        run(0, len(starts))
        return
    bounds = [len(starts) * i // threads for i in range(threads + 1)]
    futures = [_thread_pool(threads).submit(run, bounds[i], bounds[i + 1]) for i in range(threads)]
    for future in futures:
        future.result()


def _torch_fold(
    weighted_sum: Tensor,
    sign_sum: Tensor | None,
    updates: Sequence[Tensor],
    weights: Sequence[float],
    sign_weights: Sequence[float],
) -> None:
    """The PyTorch path of :func:`fold_into`: per chunk, per client, ``add_``, ``sign`` and ``add_``."""
    numel = weighted_sum.numel()
    cpu = weighted_sum.device.type == "cpu"
    if not cpu:  # an accelerator: no cache to keep a chunk in, one call per client and sum
        _fold_run(weighted_sum, sign_sum, updates, weights, sign_weights, 0, numel, max(numel, 1))
        return
    if torch.get_num_threads() == 1:  # operations run on this thread: chunks as large as L2 allows
        _fold_run(weighted_sum, sign_sum, updates, weights, sign_weights, 0, numel, TORCH_CHUNK)
        return
    # Several threads: contiguous runs of chunks of at most ATen's grain size (32768), so that no
    # operation opens an OpenMP region of its own from a pool thread (nested teams oversubscribe the
    # cores, and under load every per-call barrier waits for a descheduled thread: measured 30x slower).
    starts = list(range(0, numel, CHUNK))
    threads = min(torch.get_num_threads(), len(starts) // _MIN_CHUNKS_PER_THREAD)
    if threads <= 1:
        _fold_run(weighted_sum, sign_sum, updates, weights, sign_weights, 0, numel, CHUNK)
        return
    bounds = [starts[len(starts) * i // threads] for i in range(threads)] + [numel]
    futures = [_thread_pool(threads).submit(_fold_run, weighted_sum, sign_sum, updates, weights, sign_weights,
                                            bounds[i], bounds[i + 1], CHUNK) for i in range(threads)]
    for future in futures:
        future.result()


def _fold_run(
    weighted_sum: Tensor,
    sign_sum: Tensor | None,
    updates: Sequence[Tensor],
    weights: Sequence[float],
    sign_weights: Sequence[float],
    first: int,
    last: int,
    chunk: int,
) -> None:
    """Fold elements ``[first, last)`` of every update in, ``chunk`` elements at a time."""
    scratch_all = None if sign_sum is None else torch.empty(min(chunk, last - first), dtype=updates[0].dtype,
                                                            device=sign_sum.device)  # a sign is exact in any dtype
    for start in range(first, last, chunk):
        end = min(start + chunk, last)
        total = weighted_sum[start:end]
        if sign_sum is None:
            for update, w in zip(updates, weights, strict=True):
                total.add_(update[start:end], alpha=w)
            continue
        signs = sign_sum[start:end]
        scratch = scratch_all[: end - start]  # type: ignore[index]
        for update, w, sw in zip(updates, weights, sign_weights, strict=True):
            part = update[start:end]
            total.add_(part, alpha=w)
            torch.sign(part, out=scratch)
            signs.add_(scratch, alpha=sw)


def _native_kernel(weighted_sum: Tensor, sign_sum: Tensor | None, updates: Sequence[Tensor]) -> FoldKernel | None:
    """The compiled fold kernel if every tensor suits it (float32, CPU, contiguous), else None."""
    tensors = [weighted_sum, *updates] + ([] if sign_sum is None else [sign_sum])
    if not all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return fold_kernel()


class Accumulator:
    """Shared bookkeeping of the streaming rules: shape/dtype checks, weights, client count.

    A rule subclasses it and calls ``_admit(update, weight)`` in ``add`` (update: a 1-D float tensor [d];
    returns the weight as a float; raises ValueError naming the client for a bad update or weight) and
    ``_check_ready()`` in ``result`` (raises ValueError for an empty round, or a total weight that is zero or
    out of the accumulation dtype's range).
    """

    def __init__(self, check_finite: bool = True) -> None:
        self.check_finite = check_finite
        self.count = 0
        self.total_weight = 0.0
        self._shape: torch.Size | None = None
        self._dtype: torch.dtype | None = None
        self._accumulate: torch.dtype | None = None  # accumulation_dtype(self._dtype)

    def _admit(self, update: Tensor, weight: float, check_finite: bool | None = None) -> float:
        index = self.count
        check_finite = self.check_finite if check_finite is None else check_finite
        if not isinstance(update, Tensor):
            raise ValueError(f"client {index}: update must be a torch.Tensor, got {type(update).__name__}")
        if update.dim() != 1:
            raise ValueError(
                f"client {index}: update must be a 1-D tensor (flat parameter vector), "
                f"got shape {tuple(update.shape)}"
            )
        if not update.is_floating_point():
            raise ValueError(f"client {index}: update must be a floating-point tensor, got {update.dtype}")
        if self._shape is None:
            self._shape, self._dtype = update.shape, update.dtype
            self._accumulate = accumulation_dtype(update.dtype)
        elif update.shape != self._shape:
            raise ValueError(
                f"client {index}: update has shape {tuple(update.shape)}, "
                f"expected {tuple(self._shape)} like client 0"
            )
        elif update.dtype != self._dtype:
            raise ValueError(f"client {index}: update has dtype {update.dtype}, expected {self._dtype}")
        if check_finite and not all_finite(update):
            raise ValueError(f"client {index}: update contains NaN or infinite values")
        w = check_weight(weight, index)
        if w > torch.finfo(self._accumulate).max:  # it would become inf in the sums' precision
            raise ValueError(f"client {index}: weight {weight!r} is too large for {update.dtype} updates "
                             f"(summed in {self._accumulate}; use sample counts as weights)")
        self.count += 1
        self.total_weight += w
        return w

    def _check_sum(self, weighted_sum: Tensor) -> None:
        """Finite updates and weights can still overflow the running sum; say so rather than return inf."""
        if self.check_finite and not all_finite(weighted_sum):
            raise ValueError(
                f"cannot aggregate: the weighted sum of the updates overflowed {weighted_sum.dtype} "
                "(weights or updates too large; use sample counts as weights)"
            )

    def _zeros(self, update: Tensor) -> Tensor:
        """A d-sized running sum in the accumulation dtype."""
        return torch.zeros_like(update, dtype=self._accumulate)

    def _check_ready(self) -> None:
        if self.count == 0:
            raise ValueError("cannot aggregate: no client update was added (empty list)")
        if self.total_weight <= 0:
            raise ValueError("cannot aggregate: the client weights sum to zero")
        if self.total_weight < torch.finfo(self._accumulate).tiny:  # type: ignore[arg-type]
            raise ValueError(
                f"cannot aggregate: the client weights sum to {self.total_weight:g}, too small for "
                f"{self._accumulate} (use sample counts as weights)"
            )
        if self.total_weight > torch.finfo(self._accumulate).max:  # type: ignore[arg-type]
            raise ValueError(
                f"cannot aggregate: the client weights sum to {self.total_weight:g}, too large for "
                f"{self._accumulate} (use sample counts as weights)"
            )


Updates = Tensor | Sequence[Tensor]


def update_rows(updates: Updates) -> Iterable[Tensor]:
    """The K updates as rows: a [K, d] tensor's K rows (views), or the sequence itself (not checked further).

    Raises:
        ValueError: a tensor that is not 2-D, or an object that is not a sequence (a string included).
    """
    if isinstance(updates, Tensor):
        if updates.dim() != 2:
            raise ValueError(f"updates must be a 2-D tensor [K, d] or a list of 1-D tensors, "
                             f"got a tensor of shape {tuple(updates.shape)}")
        return updates.unbind(0)
    if isinstance(updates, (str, bytes)) or not isinstance(updates, Sequence):
        raise ValueError(f"updates must be a 2-D tensor or a sequence of 1-D tensors, got {type(updates).__name__}")
    return updates
