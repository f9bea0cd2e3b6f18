"""Aggregation rules: how the server turns K client updates into one update.

Every rule exists in two forms that give the same numbers:

* a function on all updates at once (``mean``, ``gma``), taking a 2-D tensor ``[K, d]`` or a
  sequence of K 1-D tensors, which it never stacks;
* a streaming aggregator (``MeanAggregator``, ``GMAAggregator``) that folds one client's update in
  at a time with ``add(update, weight)`` and keeps O(d) state whatever K is, then ``result()``.

The functions are thin wrappers over the aggregators, so the maths lives in one place. All state is
sum-decomposable (sums of ``w·Δ`` and of signs), which keeps secure aggregation possible. The running
sums themselves (the admission checks, the chunked and compiled fold) are :mod:`fedgma.accumulator`'s.

Precision: every float dtype is accepted (float16, bfloat16, float32, float64). The running sums
are kept in the *accumulation dtype*: float32 for the 16-bit dtypes (whose range, 65504 for
float16, is exceeded by Σ n_k Δ_k with realistic sample counts, and whose sign counts are exact
only up to 2048 clients for float16, 256 for bfloat16), the update's own dtype otherwise; results
come back in the update's dtype. Weights are used as given, not rescaled before accumulating: in the
accumulation dtype Σ w_k Δ_k cannot overflow for any realistic weight, and leaving them keeps float32
results bit-identical to earlier versions. The agreement's normaliser Σ s_k is summed in the
accumulation dtype in client order, by the same additions that build the sign sum, so on a unanimous
coordinate |Σ s_k sign Δ_k| equals it bit for bit and the agreement is exactly 1, whatever the
weights (e.g. 5.2 and 2.2 in float32, or sample counts summing past 2^24).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import Field
from torch import Tensor

from fedgma.accumulator import Accumulator, Updates, accumulation_dtype, all_finite, fold_into, update_rows
from fedgma.registry import AGGREGATORS, NoOptions, Options

__all__ = [
    "Aggregator",
    "GMAAggregator",
    "Layer",
    "MeanAggregator",
    "accumulation_dtype",
    "available_aggregators",
    "gma",
    "gma_mask",
    "make_aggregator",
    "mean",
    "register_aggregator",
    "sign_agreement",
]

AGREEMENT_BINS = 10
_Accumulator = Accumulator  # its name before fedgma.accumulator (docs/ARCHITECTURE.md named it as the base to extend)


@dataclass(frozen=True)
class Layer:
    """A named slice ``[start, start + numel)`` of the flat parameter vector, for per-layer stats."""

    name: str
    start: int
    numel: int


class Aggregator(Protocol):
    """Streaming aggregation rule: ``add`` one client's update at a time, then ``result``."""

    def add(self, update: Tensor, weight: float = 1.0) -> None: ...

    def result(self) -> tuple[Tensor, dict[str, Any]]: ...


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"GMA threshold must lie in [0, 1], got {threshold!r}")
    return t


# --------------------------------------------------------------------------------------------
# Plain weighted averaging (FedAvg)
# --------------------------------------------------------------------------------------------


class MeanAggregator(Accumulator):
    """Weighted average Σ_k p_k Δ_k with p_k = n_k / Σ n_k (McMahan et al. 2017, FedAvg)."""

    name = "mean"

    def __init__(self, check_finite: bool = True) -> None:
        super().__init__(check_finite)
        self._weighted_sum: Tensor | None = None

    def add(self, update: Tensor, weight: float = 1.0) -> None:
        w = self._admit(update, weight)
        if self._weighted_sum is None:
            self._weighted_sum = self._zeros(update)
        fold_into(self._weighted_sum, None, [update], [w], [1.0])

    def average(self, _consume: bool = False) -> Tensor:
        self._check_ready()
        assert self._weighted_sum is not None
        if not _consume:  # the one-shot functions (_consume) checked the sum in _fold already
            self._check_sum(self._weighted_sum)
        if _consume:  # the one-shot functions: divide in place, the aggregator is discarded
            return self._weighted_sum.div_(self.total_weight).to(self._dtype)
        return (self._weighted_sum / self.total_weight).to(self._dtype)  # the updates' dtype

    def result(self) -> tuple[Tensor, dict[str, Any]]:
        return self.average(), {"num_clients": self.count}

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


# --------------------------------------------------------------------------------------------
# Gradient Masked Averaging
# --------------------------------------------------------------------------------------------


def gma_mask(agreement: Tensor, threshold: float, hard: bool = False) -> Tensor:
    """GMA's mask from sign agreement A: 1 where A ≥ τ, else A (soft) or 0 (hard, the AND-mask).

    The soft mask is the one of Tenison et al. 2023 ("Gradient Masked Averaging for Federated
    Learning", TMLR); ``hard=True`` is the AND-mask of Parascandolo et al. 2021 that it relaxes.
    """
    threshold = _check_threshold(threshold)
    below = agreement < threshold
    if hard:
        return torch.where(below, 0.0, 1.0).to(agreement.dtype)
    return torch.where(below, agreement, 1.0)


def sign_agreement(sign_sum: Tensor, normaliser: float) -> Tensor:
    """Per-coordinate sign agreement A = |Σ_k s_k sign(Δ_k)| / Σ_k s_k, in [0, 1]."""
    return sign_sum.abs().div_(normaliser).clamp_(max=1.0)  # abs() copies: sign_sum is left as it was


class GMAAggregator(Accumulator):
    """Gradient Masked Averaging (Tenison et al., TMLR 2023, arXiv 2201.11986).

    Keeps two d-sized running sums, Σ n_k Δ_k and Σ sign(Δ_k) (or Σ n_k sign(Δ_k) with
    ``weighted_agreement``, as declearn does). The result is m ⊙ Σ p_k Δ_k where the agreement
    A = |(1/K) Σ_k sign(Δ_k)| sets the mask m = 1 where A ≥ τ, else A (soft) or 0 (``hard``).
    With τ = 0 the mask is all ones and the result is exactly the weighted mean.
    """

    name = "gma"

    def __init__(
        self,
        threshold: float = 0.4,
        hard: bool = False,
        weighted_agreement: bool = False,
        layers: Sequence[Layer] | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(check_finite)
        self.threshold = _check_threshold(threshold)
        self.hard = bool(hard)
        self.weighted_agreement = bool(weighted_agreement)
        self.layers = list(layers) if layers is not None else None
        self._weighted_sum: Tensor | None = None
        self._sign_sum: Tensor | None = None
        self._sign_total: Tensor | None = None  # Σ s_k in the accumulation dtype, summed like the sign sum

    def add(self, update: Tensor, weight: float = 1.0) -> None:
        """Fold one client's update into the two running sums (O(d) memory whatever the number of clients).

        Args:
            update: a 1-D float tensor [d]; every update of a round has the first one's shape and dtype.
            weight: a finite non-negative weight, usually the client's sample count n_k (only ratios matter).

        Raises:
            ValueError: not a 1-D float tensor, another shape or dtype than the first update, a NaN or
            infinite entry (when ``check_finite``), or a bad weight; the message names the client's index.
        """
        w = self._admit(update, weight)
        if self._weighted_sum is None:
            self._weighted_sum = self._zeros(update)
            self._sign_sum = self._zeros(update)
        sign_weight = w if self.weighted_agreement else 1.0
        fold_into(self._weighted_sum, self._sign_sum, [update], [w], [sign_weight])
        self._add_sign_weights([sign_weight])

    def _add_sign_weights(self, sign_weights: Sequence[float]) -> None:
        """Σ s_k by the additions the sign sum makes on a unanimous coordinate: fl(t + fl(s_k)), in order."""
        if self._sign_total is None:
            self._sign_total = torch.zeros((), dtype=self._accumulate)
        for sw in sign_weights:
            self._sign_total.add_(sw)

    def agreement(self, _consume: bool = False) -> Tensor:
        """Per-coordinate sign agreement A in [0, 1] of the updates added so far, shape [d].

        A = |Σ_k s_k sign(Δ_k)| / Σ_k s_k in the accumulation dtype (float32 for 16-bit updates):
        exactly 1 where every update has the same non-zero sign, whatever the weights.
        """
        self._check_ready()
        assert self._sign_sum is not None and self._sign_total is not None
        normaliser = float(self._sign_total)  # exact in the sums' dtype: a unanimous |S| / it is exactly 1
        if _consume:  # A computed in place in the sign sum (the same operations as sign_agreement)
            return self._sign_sum.abs_().div_(normaliser).clamp_(max=1.0)
        return sign_agreement(self._sign_sum, normaliser)

    def result(self, _consume: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """The masked average m ⊙ Σ p_k Δ_k [d] and statistics: ``num_clients``, ``mask_density``,
        ``mask_pass_fraction``, ``agreement_mean``, per-layer values and histograms when ``layers`` were
        given, and ``mask`` (the tensor [d]). The average and the mask have the updates' dtype (computed
        in the accumulation dtype). The aggregator can keep taking updates afterwards.

        Raises:
            ValueError: no update was added, the weights sum to zero (or under/overflow the dtype), or
            the weighted sum is not finite.
        """
        # Memory: A is computed in the sign sum's copy (in the sign sum itself for the one-shot functions,
        # _consume), its statistics taken, then it is turned into the mask in place; the peak is the two
        # running sums, A, and one boolean d-sized buffer. Statistics are the same bits as before.
        self._check_ready()
        assert self._weighted_sum is not None
        if not _consume:  # the one-shot functions (_consume) checked the sum in _fold already
            self._check_sum(self._weighted_sum)
        agreement = self.agreement(_consume)
        passed = agreement >= self.threshold  # the complement of gma_mask's `below`
        stats: dict[str, Any] = {
            "num_clients": self.count,
            "mask_density": 0.0,  # set below, once the mask exists (key order kept)
            "mask_pass_fraction": _fraction(passed),
            "agreement_mean": float(agreement.float().mean()),
            "agreement_histogram": _histogram(agreement),
        }
        layers = [(layer.name, slice(layer.start, layer.start + layer.numel)) for layer in self.layers or ()]
        histograms = {name: _histogram(agreement[segment]) for name, segment in layers}
        mask = agreement  # gma_mask's values, built in place
        if self.hard:
            mask.copy_(passed)
        else:
            mask.masked_fill_(passed, 1.0)
        del passed, agreement
        stats["mask_density"] = float(mask.float().mean())
        for name, segment in layers:
            stats[f"mask_density/{name}"] = float(mask[segment].float().mean())
            stats[f"agreement_histogram/{name}"] = histograms[name]
        if _consume:
            self._sign_sum = None
            average = self._weighted_sum.div_(self.total_weight)
            self._weighted_sum = None
        else:
            average = self._weighted_sum / self.total_weight
        average.mul_(mask)
        stats["mask"] = mask.to(self._dtype)  # the updates' dtype, like the average
        return average.to(self._dtype), stats

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "threshold": self.threshold,
            "hard": self.hard,
            "weighted_agreement": self.weighted_agreement,
        }


def _fraction(flags: Tensor) -> float:
    """``float(flags.float().mean())`` of a boolean tensor, without the float copy: the same bits.

    On the CPU ``mean`` is a float32 sum then ``div_`` by the count; a sum of 0s and 1s is the exact
    count while it stays below 2^24, so the count as float32, divided the same way, is the same value.
    """
    if flags.numel() >= 1 << 24 or flags.device.type != "cpu":
        return float(flags.float().mean())
    count = int(torch.count_nonzero(flags))  # flags.sum() would cast to a d-sized int64 temporary
    return float(torch.tensor(float(count), dtype=torch.float32).div_(flags.numel()))


def _histogram(values: Tensor, chunk: int = 1 << 16) -> list[int]:
    """Counts of values in [0, 1] over AGREEMENT_BINS equal bins (1.0 falls in the last bin).

    Counted over chunks so the temporaries stay small whatever d is.
    """
    counts = torch.zeros(AGREEMENT_BINS, dtype=torch.long, device=values.device)
    for start in range(0, values.numel(), chunk):
        bins = (values[start : start + chunk].float() * AGREEMENT_BINS).long().clamp_(0, AGREEMENT_BINS - 1)
        counts += torch.bincount(bins, minlength=AGREEMENT_BINS)
    return counts.tolist()


# --------------------------------------------------------------------------------------------
# One-shot functions over all updates
# --------------------------------------------------------------------------------------------


def _fold(aggregator: MeanAggregator | GMAAggregator, updates: Updates, weights: Sequence[float] | None) -> None:
    """Fold all updates into ``aggregator`` at once: the same numbers as K ``add`` calls, one memory pass.

    Every update is validated first (shape, dtype, weight: the checks of ``add``), then the chunked
    kernel loops over the clients inside each chunk, so each update is read once and the running
    sums stay in cache. Finiteness is checked on the weighted sum (a NaN/inf in any update makes it
    non-finite); only then are the updates scanned, in order, to name the first bad client, so the
    error raised is the one the streaming form would raise.
    """
    rows = update_rows(updates)
    rows = rows if isinstance(rows, Sequence) else list(rows)
    if weights is not None:
        weights = list(weights)
        if len(weights) != len(rows):
            raise ValueError(f"got {len(rows)} updates but {len(weights)} weights")
    check = aggregator.check_finite

    def raise_first_non_finite(upto: int) -> None:
        if check:
            for k in range(upto):
                if not bool(torch.isfinite(rows[k]).all()):
                    raise ValueError(f"client {k}: update contains NaN or infinite values")

    admitted: list[float] = []
    for k, row in enumerate(rows):
        structurally_ok = (
            isinstance(row, Tensor) and row.dim() == 1 and row.is_floating_point()
            and (k == 0 or (row.shape == rows[0].shape and row.dtype == rows[0].dtype))
        )
        try:
            admitted.append(aggregator._admit(row, 1.0 if weights is None else weights[k], check_finite=False))
        except ValueError:
            raise_first_non_finite(k + 1 if structurally_ok else k)
            raise
    if not rows:
        return
    first = rows[0]
    aggregator._weighted_sum = aggregator._zeros(first)
    if isinstance(aggregator, GMAAggregator):
        aggregator._sign_sum = aggregator._zeros(first)
        sign_weights = admitted if aggregator.weighted_agreement else [1.0] * len(rows)
        fold_into(aggregator._weighted_sum, aggregator._sign_sum, rows, admitted, sign_weights)
        aggregator._add_sign_weights(sign_weights)
    else:
        fold_into(aggregator._weighted_sum, None, rows, admitted, [1.0] * len(rows))
    if check and not all_finite(aggregator._weighted_sum):
        raise_first_non_finite(len(rows))
        aggregator._check_ready()  # no bad update: the sum overflowed; the errors result() would raise, in order
        aggregator._check_sum(aggregator._weighted_sum)


def mean(updates: Updates, weights: Sequence[float] | None = None) -> Tensor:
    """Weighted average Σ p_k Δ_k (FedAvg, McMahan et al. 2017).

    Args:
        updates: K client updates, a float tensor [K, d] or a sequence of K 1-D float tensors [d] of
            one shape and dtype.
        weights: K finite non-negative weights, usually sample counts n_k; normalised to
            p_k = n_k / Σ n_k (uniform when None), so only their ratios matter.

    Returns:
        The average, a tensor [d] of the updates' dtype and device.

    Raises:
        ValueError: no update, a wrong shape or dtype (naming the client), a NaN or infinite entry,
        a negative, non-finite or mismatched number of weights, or weights summing to zero.
    """
    aggregator = MeanAggregator()
    _fold(aggregator, updates, weights)
    return aggregator.average(_consume=True)


def gma(
    updates: Updates,
    weights: Sequence[float] | None = None,
    threshold: float = 0.4,
    hard: bool = False,
    weighted_agreement: bool = False,
) -> tuple[Tensor, Tensor]:
    """Gradient Masked Averaging: ``(m ⊙ Σ p_k Δ_k, m)``.

    A = |(1/K) Σ_k sign(Δ_k)| (or |Σ p_k sign(Δ_k)| with ``weighted_agreement``); m = 1 where
    A ≥ τ, else A (soft) or 0 (``hard``). τ = 0 gives plain weighted averaging exactly.
    Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023.

    Args:
        updates: K client updates, a float tensor [K, d] or a sequence of K 1-D float tensors [d] of
            one shape and dtype (for a model's state dicts: :func:`fedgma.state_dicts.gma_state_dicts`).
        weights: K finite non-negative weights, usually sample counts n_k; normalised to
            p_k = n_k / Σ n_k (uniform when None).
        threshold: τ in [0, 1].
        hard: mask 0 (not A) below τ, the AND-mask of Parascandolo et al. 2021.
        weighted_agreement: weight the signs by p_k in A.

    Returns:
        ``(aggregate, mask)``, both tensors [d] of the updates' dtype and device; mask in [0, 1].

    Raises:
        ValueError: as :func:`mean`, and a threshold outside [0, 1].
    """
    aggregator = GMAAggregator(threshold, hard=hard, weighted_agreement=weighted_agreement)
    _fold(aggregator, updates, weights)
    aggregate, stats = aggregator.result(_consume=True)
    return aggregate, stats["mask"]


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

class GMAOptions(Options):
    """Options of ``gma`` (``[server.aggregator]``): Tenison et al. 2023, Gradient Masked Averaging."""

    threshold: float = Field(0.4, ge=0, le=1, description="τ: coordinates with agreement ≥ τ keep mask 1")
    hard: bool = Field(False, description="mask 0 (not A) below τ: the AND-mask of Parascandolo et al. 2021")
    weighted_agreement: bool = Field(False, description="agreement |Σ p_k sign Δ_k| with sample weights p_k")


def register_aggregator(name: str, factory: Any, options: type[Options] = NoOptions) -> None:
    """Make an aggregation rule available by name (``server.aggregator`` in a config).

    ``factory(**options, layers=..., check_finite=...)`` must return a fresh streaming aggregator;
    ``options`` is the pydantic model of its options (a subclass of :class:`fedgma.registry.Options`).
    """
    AGGREGATORS.register(name, factory, options)


def available_aggregators() -> list[str]:
    """Names of every registered aggregation rule (built-in rules included as soon as this is called)."""
    return AGGREGATORS.names()


def make_aggregator(
    name: str, layers: Sequence[Layer] | None = None, check_finite: bool = True, **options: Any
) -> Aggregator:
    """Build a fresh streaming aggregator by name with its own options.

    Args:
        name: a registered rule (:func:`available_aggregators`).
        layers: the model's layers (names and slices of the flat vector), for per-layer statistics.
        check_finite: refuse non-finite updates in ``add`` (the default).
        **options: the rule's options, e.g. ``threshold=0.4`` for ``gma``.

    Raises:
        ValueError: unknown rule, an option the rule does not take (with did-you-mean), or a value
            out of range; the message names the rule and the option.
    """
    return AGGREGATORS.build(name, options, layers=layers, check_finite=check_finite)


def _make_mean(layers: Sequence[Layer] | None = None, check_finite: bool = True) -> MeanAggregator:
    return MeanAggregator(check_finite=check_finite)


def _make_gma(
    layers: Sequence[Layer] | None = None,
    threshold: float = 0.4,
    hard: bool = False,
    weighted_agreement: bool = False,
    check_finite: bool = True,
) -> GMAAggregator:
    return GMAAggregator(threshold, hard, weighted_agreement, layers=layers, check_finite=check_finite)


register_aggregator("mean", _make_mean)
register_aggregator("gma", _make_gma, GMAOptions)
