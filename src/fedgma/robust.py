"""Robust aggregation: rules that a few bad clients cannot drag far, and the checks every reply passes.

* ``median``: coordinate-wise median of the K updates (Yin et al. 2018, "Byzantine-Robust
  Distributed Learning: Towards Optimal Statistical Rates", ICML).
* ``trimmed_mean``: per coordinate, drop the ⌊βK⌋ largest and ⌊βK⌋ smallest values and average
  the rest (same paper); β is ``server.trim_fraction``.
* norm clipping (``server.clip_norm``): every update is scaled to norm ≤ c before it reaches the
  rule, so it composes with any of them, mean and GMA included (Sun et al. 2019, "Can You Really
  Backdoor Federated Learning?"). :func:`with_clipping` wraps any streaming aggregator.
* :func:`update_problem`: what is wrong with one client's reply (type, shape, non-finite values,
  norm above ``server.max_update_norm``), checked before anything is aggregated.

Median and trimmed mean are order statistics, so unlike mean and GMA they are not sum-decomposable:
they keep every update of the round (O(K·d) memory) and ignore the sample-count weights (each
client counts once, as in Yin et al.); weights are still validated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fedgma.accumulator import Accumulator
from fedgma.aggregation import Aggregator, Layer, register_aggregator
from fedgma.registry import Options

__all__ = [
    "MedianAggregator",
    "NormClipping",
    "TrimmedMeanAggregator",
    "clip_to_norm",
    "update_problem",
    "with_clipping",
]


class _Buffered(Accumulator):
    """Keeps a copy of every admitted update; subclasses reduce the sorted [K, d] stack."""

    name = "buffered"

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__(check_finite)
        self._updates: list[Tensor] = []

    def add(self, update: Tensor, weight: float = 1.0) -> None:
        self._admit(update, weight)
        self._updates.append(update.detach().clone())  # a backend may reuse its buffers

    def _sorted(self) -> Tensor:
        self._check_ready()
        stacked = torch.stack(self._updates)
        self._updates = []
        return stacked.sort(dim=0).values


class MedianAggregator(_Buffered):
    """Coordinate-wise median (the mean of the two middle values when K is even). Yin et al. 2018."""

    name = "median"

    def result(self) -> tuple[Tensor, dict[str, Any]]:
        count = self.count
        ordered = self._sorted()
        middle = count // 2
        median = ordered[middle] if count % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return median, {"num_clients": count}

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


class TrimmedMeanAggregator(_Buffered):
    """Coordinate-wise β-trimmed mean: drop the ⌊βK⌋ extremes on each side, average the rest. Yin et al. 2018.

    β = 0 is the unweighted mean; β must lie in [0, 0.5) so at least one value is kept.
    """

    name = "trimmed_mean"

    def __init__(self, trim_fraction: float = 0.1, check_finite: bool = True) -> None:
        super().__init__(check_finite)
        beta = float(trim_fraction)
        if not (0.0 <= beta < 0.5):  # also rejects NaN
            raise ValueError(f"trimmed_mean: trim_fraction must lie in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = beta

    def result(self) -> tuple[Tensor, dict[str, Any]]:
        count = self.count
        trimmed = math.floor(self.trim_fraction * count)
        ordered = self._sorted()
        return ordered[trimmed : count - trimmed].mean(dim=0), {"num_clients": count, "trimmed_per_side": trimmed}

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "trim_fraction": self.trim_fraction}


# --------------------------------------------------------------------------------------------
# Norm clipping, composable with any rule
# --------------------------------------------------------------------------------------------


def clip_to_norm(update: Tensor, max_norm: float) -> Tensor:
    """``update`` scaled by min(1, c / ‖update‖₂): its direction kept, its norm at most c."""
    norm = float(update.norm())
    return update * (max_norm / norm) if norm > max_norm else update


class NormClipping:
    """Wraps an aggregator: each update is clipped to norm ≤ ``max_norm`` before the inner rule sees it.

    A non-finite update is passed on unclipped, so the inner rule's own checks reject it by name.
    ``result()`` adds ``clipped_fraction`` (share of this round's updates that were clipped).
    """

    def __init__(self, inner: Aggregator, max_norm: float) -> None:
        c = float(max_norm)
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"clip_norm must be a finite number > 0, got {max_norm!r}")
        self.inner, self.max_norm = inner, c
        self.name = f"{getattr(inner, 'name', 'aggregator')}+clip"
        self.added = self.clipped = 0

    def add(self, update: Tensor, weight: float = 1.0) -> None:
        if isinstance(update, Tensor) and update.is_floating_point() and bool(torch.isfinite(update).all()):
            clipped = clip_to_norm(update, self.max_norm)
            self.clipped += clipped is not update
            update = clipped
        self.inner.add(update, weight)
        self.added += 1

    def result(self) -> tuple[Tensor, dict[str, Any]]:
        aggregate, stats = self.inner.result()
        return aggregate, {**stats, "clipped_fraction": self.clipped / max(self.added, 1)}

    def get_config(self) -> dict[str, Any]:
        inner = self.inner.get_config() if hasattr(self.inner, "get_config") else {}
        return {**inner, "clip_norm": self.max_norm}


def with_clipping(aggregator: Aggregator, clip_norm: float | None) -> Aggregator:
    """``aggregator`` behind norm clipping at ``clip_norm``, or unchanged when ``clip_norm`` is None."""
    return aggregator if clip_norm is None else NormClipping(aggregator, clip_norm)


# --------------------------------------------------------------------------------------------
# Validation of one client's reply
# --------------------------------------------------------------------------------------------


def update_problem(update: Any, numel: int, max_norm: float | None = None) -> str | None:
    """What is wrong with a client's update, in words, or None if it may be aggregated.

    Checks, in order: a floating-point tensor, shape ``(numel,)``, every value finite, and
    (when ``max_norm`` is set) ‖update‖₂ ≤ ``max_norm``.
    """
    if not isinstance(update, Tensor):
        return f"sent a {type(update).__name__}, not a tensor"
    if tuple(update.shape) != (numel,):
        return f"sent an update of shape {tuple(update.shape)}, expected ({numel},)"
    if not update.is_floating_point():
        return f"sent an update of dtype {update.dtype}, expected a floating-point tensor"
    bad = 0 if math.isfinite(float(update.sum())) else int((~torch.isfinite(update)).sum())  # one pass if finite
    if bad:
        return f"sent an update with {bad} NaN/infinite value(s)"
    if max_norm is not None:
        norm = float(update.norm())
        if not norm <= max_norm:
            return f"sent an update of norm {norm:.4g} > server.max_update_norm = {max_norm:g}"
    return None


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _make_median(layers: Sequence[Layer] | None = None, check_finite: bool = True) -> MedianAggregator:
    return MedianAggregator(check_finite=check_finite)


def _make_trimmed_mean(
    layers: Sequence[Layer] | None = None, trim_fraction: float = 0.1, check_finite: bool = True
) -> TrimmedMeanAggregator:
    return TrimmedMeanAggregator(trim_fraction, check_finite=check_finite)


class TrimmedMeanOptions(Options):
    """Options of ``trimmed_mean`` (Yin et al. 2018, coordinate-wise trimmed mean)."""

    trim_fraction: float = Field(0.1, ge=0, lt=0.5, description="fraction of clients cut at each end, per coordinate")


register_aggregator("median", _make_median)
register_aggregator("trimmed_mean", _make_trimmed_mean, TrimmedMeanOptions)
