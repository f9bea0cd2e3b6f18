"""Krum and Multi-Krum: keep the updates that sit closest to their neighbours, drop the rest.

Blanchard, El Mhamdi, Guerraoui and Stainer 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent" (NeurIPS). With n updates of which at most f are Byzantine, the score
of update i is the sum of its squared distances to its n − f − 2 nearest other updates:

    s(i) = Σ_{j ∈ N_i} ‖Δ_i − Δ_j‖²,   N_i = the n − f − 2 updates j ≠ i closest to Δ_i.

Krum returns the update of lowest score; Multi-Krum (``num_selected`` = m > 1) returns the plain
average of the m updates of lowest score. The rule needs n > 2f + 2 (so N_i is not empty and the
honest updates outnumber what f attackers can surround); a round with fewer updates is refused.

This module is also the worked example of adding an aggregator in one file (docs/ARCHITECTURE.md):
a streaming class with ``add`` / ``result``, an options model, and one registration line at the
bottom; the module is listed in ``AGGREGATORS``'s modules in :mod:`fedgma.registry`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from fedgma.accumulator import Accumulator, Updates, update_rows
from fedgma.aggregation import Layer, mean, register_aggregator
from fedgma.registry import Options

__all__ = ["KrumAggregator", "KrumOptions", "krum", "krum_scores"]


def krum_scores(updates: Sequence[Tensor], num_byzantine: int) -> Tensor:
    """Krum's score of each update: the sum of its squared L2 distances to its n − f − 2 nearest others.

    Args:
        updates: n 1-D floating-point tensors of one shape [d] (not checked here).
        num_byzantine: f ≥ 0, with n > 2f + 2.

    Returns:
        A float64 tensor of shape [n]. Each pairwise distance is computed once, from the
        difference in the updates' dtype, squared and summed in float64, and used for both ends,
        so the distance matrix is exactly symmetric; each score sums its n − f − 2 smallest
        distances in ascending order, so it does not depend on the order of the updates.
        Costs n(n − 1)/2 passes over d values and one d-sized float64 temporary.

    Raises:
        ValueError: n ≤ 2f + 2.
    """
    n = len(updates)
    neighbours = n - num_byzantine - 2
    if n <= 2 * num_byzantine + 2:
        raise ValueError(f"cannot aggregate: krum needs more than 2·num_byzantine + 2 = {2 * num_byzantine + 2} "
                         f"updates (num_byzantine = {num_byzantine}), got {n}")
    distances = torch.zeros(n, n, dtype=torch.float64)
    difference = torch.empty_like(updates[0])
    for i in range(n):
        for j in range(i + 1, n):
            torch.sub(updates[i], updates[j], out=difference)
            wide = difference.to(torch.float64)
            distances[i, j] = distances[j, i] = torch.dot(wide, wide)
    others = distances.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    nearest = others.sort(dim=1).values[:, :neighbours]
    return nearest.sum(dim=1)


def _ranking(scores: Tensor, updates: Sequence[Tensor]) -> list[int]:
    """Indices by ascending score; equal scores are ordered by the updates' values (lexicographically).

    The tie-break makes the ranking a function of the multiset of updates, not of their order:
    two updates that tie and are equal are interchangeable.
    """

    values = scores.tolist()

    def compare(i: int, j: int) -> int:
        if values[i] != values[j]:
            return -1 if values[i] < values[j] else 1
        differs = torch.nonzero(updates[i] != updates[j])
        if differs.numel() == 0:
            return 0
        k = int(differs[0, 0])
        return -1 if updates[i][k] < updates[j][k] else 1

    return sorted(range(len(updates)), key=functools.cmp_to_key(compare))


class KrumAggregator(Accumulator):
    """Krum (``num_selected`` = 1) and Multi-Krum (m > 1), Blanchard et al. 2017.

    ``add`` keeps a copy of every update, so memory is O(K·d) for K clients (like ``median``);
    ``result`` computes the K(K − 1)/2 pairwise distances (O(K²·d) time).

    The m selected updates are averaged *plainly*, each counting once, not weighted by sample
    count: weights are reported by the clients, and a Byzantine client that is selected could
    otherwise claim a huge sample count and dominate the average, undoing the selection. This is
    Blanchard et al.'s Multi-Krum and the choice of the other robust rules here (median,
    trimmed_mean). Weights are still validated and must not all be zero. With f = 0 and m = K
    the result is the unweighted mean of all updates.

    The selected updates are averaged in ascending score order (ties by value), so the result is
    bit-identical under any permutation of the clients.
    """

    name = "krum"

    def __init__(self, num_byzantine: int = 1, num_selected: int = 1, check_finite: bool = True) -> None:
        super().__init__(check_finite)
        if int(num_byzantine) != num_byzantine or num_byzantine < 0:
            raise ValueError(f"krum: num_byzantine must be an integer ≥ 0, got {num_byzantine!r}")
        if int(num_selected) != num_selected or num_selected < 1:
            raise ValueError(f"krum: num_selected must be an integer ≥ 1, got {num_selected!r}")
        self.num_byzantine, self.num_selected = int(num_byzantine), int(num_selected)
        self._updates: list[Tensor] = []

    def add(self, update: Tensor, weight: float = 1.0) -> None:
        """Check and keep one client's update [d] (copied: a backend may reuse its buffer)."""
        self._admit(update, weight)
        self._updates.append(update.detach().clone())

    def result(self) -> tuple[Tensor, dict[str, Any]]:
        """The plain average of the m best-scored updates, shape [d], and statistics.

        Statistics: ``num_clients``; ``selected``, the positions (in the order of ``add``) of the
        selected clients, best score first; ``score_selected_max``, the largest selected score.

        Raises:
            ValueError: no update was added, the weights sum to zero, K ≤ 2f + 2, or m > K;
                the message starts with "cannot aggregate".
        """
        self._check_ready()
        count, updates = self.count, self._updates
        if self.num_selected > count:
            raise ValueError(f"cannot aggregate: krum num_selected = {self.num_selected} is more than the "
                             f"{count} updates of the round")
        scores = krum_scores(updates, self.num_byzantine)
        selected = _ranking(scores, updates)[: self.num_selected]
        self._updates = []
        average = mean([updates[i] for i in selected])  # unweighted, in ascending score order
        return average, {
            "num_clients": count,
            "selected": selected,
            "score_selected_max": float(scores[selected[-1]]),
        }

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "num_byzantine": self.num_byzantine, "num_selected": self.num_selected}


def krum(updates: Updates, weights: Sequence[float] | None = None, num_byzantine: int = 1,
         num_selected: int = 1) -> Tensor:
    """Krum / Multi-Krum of all updates at once: the same numbers as K ``add`` calls then ``result``.

    Args:
        updates: a [K, d] tensor or K tensors of shape [d].
        weights: sample counts, validated but not used in the average (see :class:`KrumAggregator`).
        num_byzantine: f, the number of Byzantine clients tolerated; K must exceed 2f + 2.
        num_selected: m, how many best-scored updates are averaged (1: Krum).

    Returns:
        The aggregate, shape [d], in the updates' dtype.

    Raises:
        ValueError: a bad update or weight (naming the client), K ≤ 2f + 2, or m > K.
    """
    rows = list(update_rows(updates))
    if weights is not None and len(weights) != len(rows):
        raise ValueError(f"got {len(rows)} updates but {len(weights)} weights")
    aggregator = KrumAggregator(num_byzantine, num_selected)
    for k, row in enumerate(rows):
        aggregator.add(row, 1.0 if weights is None else weights[k])
    return aggregator.result()[0]


class KrumOptions(Options):
    """Options of ``krum`` (``[server.aggregator]``): Blanchard et al. 2017, Krum and Multi-Krum."""

    num_byzantine: int = Field(1, ge=0, le=10**6, description="f: Byzantine clients tolerated; needs K > 2f + 2")
    num_selected: int = Field(1, ge=1, le=10**6, description="m: best-scored updates averaged (1: Krum)")


def _make_krum(layers: Sequence[Layer] | None = None, num_byzantine: int = 1, num_selected: int = 1,
               check_finite: bool = True) -> KrumAggregator:
    return KrumAggregator(num_byzantine, num_selected, check_finite=check_finite)


register_aggregator("krum", _make_krum, KrumOptions)
