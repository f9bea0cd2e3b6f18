"""Mechanism ablations of Gradient Masked Averaging: is GMA more than step damping?

GMA (Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023) multiplies the
weighted mean of the client updates, coordinate by coordinate, by a mask m ∈ [0, 1]^d built from
the clients' sign agreement. That does two things at once: it *shrinks the step* (by the mask's
density mean(m) on average) and it *chooses where* to shrink (coordinates where clients disagree).
Each rule here keeps one of the two and drops the other, so comparing it with ``gma`` and ``mean``
under the same protocol says which one the accuracy comes from:

* ``gma_random_mask``: GMA's own mask values, randomly permuted across coordinates each round. The
  per-round mask distribution (hence the density, the step's shrinkage) is GMA's exactly; only the
  placement is random. *Question: does it matter where GMA masks, or only how much?* If
  ``gma_random_mask`` matches ``gma``, the placement carries no information.
* ``mean_density_scaled``: plain averaging with the whole step scaled by GMA's mask density
  mean(m), computed from the same sign sums. *Question: is GMA a data-driven global step size?* If
  it matches ``gma``, GMA is a learning-rate schedule (a smaller server lr where clients disagree).

Both are streaming aggregators with GMA's O(d) state (the two running sums of
:class:`fedgma.aggregation.GMAAggregator`), take GMA's options (``threshold``, ``hard``,
``weighted_agreement``) and log GMA's mask statistics, so their rounds are comparable with GMA's.

Randomness: ``gma_random_mask`` draws its permutation from a ``torch.Generator`` passed as the
factory's ``generator`` context argument. The simulator passes one per round,
``fedgma.seeding.torch_generator(seed, "aggregation", round)`` (see
:func:`fedgma.simulation.aggregator_factory`), so the mask differs from round to round and a run,
resumed or not, is reproducible from its seed. Built without a generator (``make_aggregator`` by
hand, the Flower strategy) it uses the stream of seed 0, round 0: deterministic, but the same
permutation every round of equal size.

* ``gma_mask_after_optimizer``: GMA's mask applied to the server optimizer's *step* instead of its
  input. The server optimizer (FedAvgM's momentum, FedAdam's moments) sees the plain mean update as
  its pseudo-gradient, and the mask then damps the step it proposes: θ ← θ + m ⊙ (opt.step(θ, −ū) − θ)
  (:func:`fedgma.round.run_round` applies the ``step_mask`` this aggregator reports). With the plain
  server SGD (no momentum) it is ``gma`` up to rounding; with momentum or adaptive moments the
  optimizer's memory is no longer masked. *Question: does GMA act through the optimizer's state
  (masked pseudo-gradients fill the momentum) or only on the step?*
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fedgma.accumulator import Updates, update_rows
from fedgma.aggregation import GMAAggregator, GMAOptions, Layer, gma_mask, register_aggregator
from fedgma.seeding import torch_generator

__all__ = ["MaskAfterOptimizerAggregator", "MeanDensityScaledAggregator", "RandomMaskAggregator", "gma_random_mask",
           "mean_density_scaled"]


def _unmasked_mean(aggregator: GMAAggregator) -> Tensor:
    """Σ w_k Δ_k / Σ w_k in the accumulation dtype (a copy: the running sum is left as it was)."""
    assert aggregator._weighted_sum is not None
    return aggregator._weighted_sum / aggregator.total_weight


class RandomMaskAggregator(GMAAggregator):
    """GMA with its soft (or hard) mask values randomly permuted across coordinates.

    Each :meth:`result` computes GMA's mask m from the sign sums (exactly as ``gma``), draws a
    uniformly random permutation π of the d coordinates from ``generator``, and returns
    ``m[π] ⊙ Σ p_k Δ_k``. The multiset of mask values, so the density mean(m), the pass fraction and
    the agreement histogram, are GMA's; only which coordinate gets which value is random.
    Answers: does GMA's *placement* of the damping matter, or only its amount?

    Args:
        threshold, hard, weighted_agreement: as :class:`~fedgma.aggregation.GMAAggregator`.
        generator: the source of the permutation (CPU ``torch.Generator``); the simulator passes one
            per round. None: ``torch_generator(0, "aggregation", 0)``.
        layers, check_finite: as :class:`~fedgma.aggregation.GMAAggregator`.
    """

    name = "gma_random_mask"

    def __init__(self, threshold: float = 0.4, hard: bool = False, weighted_agreement: bool = False,
                 layers: Sequence[Layer] | None = None, check_finite: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(threshold, hard, weighted_agreement, layers=layers, check_finite=check_finite)
        self.generator = generator if generator is not None else torch_generator(0, "aggregation", 0)

    def result(self, _consume: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """``(m[π] ⊙ Σ p_k Δ_k [d] in the updates' dtype, stats)``.

        ``stats`` are GMA's (``mask_density`` is GMA's density, equal to the permuted mask's by
        construction), except ``mask`` (the permuted mask applied, [d]) and the per-layer densities
        ``mask_density/<layer>`` (of the permuted mask). Draws one permutation from ``generator``.

        Raises:
            ValueError: as :meth:`GMAAggregator.result`.
        """
        _, stats = super().result()  # checks, and GMA's statistics; the running sums are kept
        mask = gma_mask(self.agreement(), self.threshold, self.hard)  # accumulation dtype, GMA's values
        order = torch.randperm(mask.numel(), generator=self.generator).to(mask.device)
        shuffled = mask[order]
        del mask
        for layer in self.layers or ():
            segment = shuffled[layer.start: layer.start + layer.numel]
            stats[f"mask_density/{layer.name}"] = float(segment.float().mean())
        stats["mask"] = shuffled.to(self._dtype)
        return _unmasked_mean(self).mul_(shuffled).to(self._dtype), stats

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "name": self.name}


class MeanDensityScaledAggregator(GMAAggregator):
    """Plain weighted averaging with the step scaled by GMA's mask density: ``mean(m) · Σ p_k Δ_k``.

    mean(m) is the density GMA reports (``mask_density``: the float32 mean of GMA's mask, built from
    the same sign sums). Every coordinate gets the same factor, so the step shrinks exactly as much
    on average as GMA's and in the mean's direction. Answers: is GMA only a data-driven global step
    size (a server lr that drops when clients disagree)?

    Args: as :class:`~fedgma.aggregation.GMAAggregator`.
    """

    name = "mean_density_scaled"

    def result(self, _consume: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """``(mean(m) · Σ p_k Δ_k [d] in the updates' dtype, stats)``: the mean in the updates' dtype
        times the density (so bit for bit ``mean(updates, weights) * stats["mask_density"]``); stats
        are GMA's, with ``mask`` the constant mask mean(m) applied, [d].

        Raises:
            ValueError: as :meth:`GMAAggregator.result`.
        """
        _, stats = super().result()
        density = stats["mask_density"]
        stats["mask"] = torch.full_like(stats["mask"], density)
        return _unmasked_mean(self).to(self._dtype).mul_(density), stats

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "name": self.name}


class MaskAfterOptimizerAggregator(GMAAggregator):
    """GMA's mask moved from the server optimizer's input to its step.

    :meth:`result` returns the plain weighted mean Σ p_k Δ_k (so the server optimizer's pseudo-gradient
    is −Σ p_k Δ_k, unmasked) and GMA's mask m in ``stats["step_mask"]``; :func:`fedgma.round.run_round`
    then sets θ ← θ + m ⊙ (opt.step(θ, −Σ p_k Δ_k) − θ). Answers: under FedAvgM or FedAdam, does it
    matter whether the mask acts before the optimizer's momentum/moments or after them?

    Args: as :class:`~fedgma.aggregation.GMAAggregator`.
    """

    name = "gma_mask_after_optimizer"

    def result(self, _consume: bool = False) -> tuple[Tensor, dict[str, Any]]:
        """``(Σ p_k Δ_k [d] in the updates' dtype, stats)``: stats are GMA's plus ``step_mask``, GMA's mask
        [d] (``mask`` too, for the mask statistics).

        Raises:
            ValueError: as :meth:`GMAAggregator.result`.
        """
        _, stats = super().result()
        stats["step_mask"] = stats["mask"]
        return _unmasked_mean(self).to(self._dtype), stats

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "name": self.name}


def _fold_all(aggregator: GMAAggregator, updates: Updates, weights: Sequence[float] | None) -> tuple[Tensor, dict]:
    rows = list(update_rows(updates))
    if weights is not None and len(weights) != len(rows):
        raise ValueError(f"got {len(rows)} updates but {len(weights)} weights")
    for k, row in enumerate(rows):
        aggregator.add(row, 1.0 if weights is None else weights[k])
    return aggregator.result()


def gma_random_mask(updates: Updates, weights: Sequence[float] | None = None, threshold: float = 0.4,
                    hard: bool = False, weighted_agreement: bool = False,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One-shot :class:`RandomMaskAggregator`: ``(m[π] ⊙ Σ p_k Δ_k, m[π])``, both [d] in the updates' dtype.

    ``updates`` is a float tensor [K, d] or K 1-D tensors; ``weights`` K non-negative numbers (uniform
    when None). Raises ValueError as :func:`fedgma.aggregation.gma`.
    """
    aggregator = RandomMaskAggregator(threshold, hard, weighted_agreement, generator=generator)
    average, stats = _fold_all(aggregator, updates, weights)
    return average, stats["mask"]


def mean_density_scaled(updates: Updates, weights: Sequence[float] | None = None, threshold: float = 0.4,
                        hard: bool = False, weighted_agreement: bool = False) -> tuple[Tensor, float]:
    """One-shot :class:`MeanDensityScaledAggregator`: ``(mean(m) · Σ p_k Δ_k [d], mean(m))``.

    Arguments and errors as :func:`gma_random_mask`.
    """
    aggregator = MeanDensityScaledAggregator(threshold, hard, weighted_agreement)
    average, stats = _fold_all(aggregator, updates, weights)
    return average, stats["mask_density"]


class RandomMaskOptions(GMAOptions):
    """Options of ``gma_random_mask`` (``[server.aggregator]``): GMA's (Tenison et al. 2023), mask values
    permuted at random across coordinates each round (the permutation from the run's seed and round)."""


class MeanDensityScaledOptions(GMAOptions):
    """Options of ``mean_density_scaled`` (``[server.aggregator]``): GMA's (Tenison et al. 2023), the mean
    scaled by GMA's mask density."""


def _make_random_mask(layers: Sequence[Layer] | None = None, threshold: float = 0.4, hard: bool = False,
                      weighted_agreement: bool = False, check_finite: bool = True,
                      generator: torch.Generator | None = None) -> RandomMaskAggregator:
    return RandomMaskAggregator(threshold, hard, weighted_agreement, layers=layers, check_finite=check_finite,
                                generator=generator)


def _make_density_scaled(layers: Sequence[Layer] | None = None, threshold: float = 0.4, hard: bool = False,
                         weighted_agreement: bool = False, check_finite: bool = True) -> MeanDensityScaledAggregator:
    return MeanDensityScaledAggregator(threshold, hard, weighted_agreement, layers=layers, check_finite=check_finite)


class MaskAfterOptimizerOptions(GMAOptions):
    """Options of ``gma_mask_after_optimizer`` (``[server.aggregator]``): GMA's (Tenison et al. 2023), the mask
    applied to the server optimizer's step instead of its pseudo-gradient."""


def _make_mask_after(layers: Sequence[Layer] | None = None, threshold: float = 0.4, hard: bool = False,
                     weighted_agreement: bool = False, check_finite: bool = True) -> MaskAfterOptimizerAggregator:
    return MaskAfterOptimizerAggregator(threshold, hard, weighted_agreement, layers=layers, check_finite=check_finite)


register_aggregator("gma_random_mask", _make_random_mask, RandomMaskOptions)
register_aggregator("gma_mask_after_optimizer", _make_mask_after, MaskAfterOptimizerOptions)
register_aggregator("mean_density_scaled", _make_density_scaled, MeanDensityScaledOptions)
