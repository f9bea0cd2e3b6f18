"""The evaluation protocol of a comparison a reviewer would accept (issue 15): metrics, intervals, selection.

* **Metric**: the mean of an evaluated quantity over the last 20% of the rounds
  (:func:`last_fraction_mean`), not the last round's value, which is noisy on oscillating curves.
  Beside it, the area under the learning curve normalised by the horizon (:func:`curve_area`, an
  average accuracy over the run) and the rounds needed to reach a target accuracy
  (:func:`rounds_to_target`, None if never reached).
* **Selection**: the server lr is chosen only on validation accuracy (``validation_accuracy``, the
  split held out of the clients' data), averaged over the last 20% of rounds and over at least two
  tuning seeds (:func:`select_lr`); the reported comparisons use at least five other seeds
  (:func:`check_seeds`). The choice says when it lies on an edge of the grid, so the grid can be
  widened (:func:`fedgma.sweep.widen_lr_grid`).
* **Comparisons**: paired differences per seed with a 95% Student-t interval and the paired t-test's
  p-value (:func:`paired_difference`, scipy's ``t`` and ``ttest_rel``), and Holm's step-down
  correction across a table's comparisons (:func:`holm`; Holm 1979, "A simple sequentially
  rejective multiple test procedure", Scand. J. Statist. 6:65-70).

Evaluations are the records of a run's ``metrics.jsonl``: dicts with an integer ``round`` and float
metrics (``test_accuracy``, ``validation_accuracy``, ...), in increasing round order.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedgma.report.stats import rounds_to_target

__all__ = [
    "LAST_FRACTION", "LrChoice", "PairedDifference", "best_on_validation", "check_seeds", "curve_area", "holm",
    "holm_correct",
    "last_fraction_mean", "paired_difference", "rounds_to_target", "run_metrics", "select_lr",
]

LAST_FRACTION = 0.2
Records = Sequence[Mapping[str, Any]]


def _series(metrics: Records, key: str) -> tuple[list[int], list[float]]:
    rounds, values = [], []
    for record in metrics:
        if key in record and record[key] is not None:
            rounds.append(int(record["round"]))
            values.append(float(record[key]))
    if not rounds:
        raise ValueError(f"no evaluation holds {key!r}")
    if any(b <= a for a, b in itertools.pairwise(rounds)):
        raise ValueError(f"the evaluations of {key!r} are not in increasing round order: {rounds}")
    return rounds, values


def last_fraction_mean(metrics: Records, key: str = "test_accuracy", horizon: int | None = None,
                       fraction: float = LAST_FRACTION) -> float:
    """The mean of ``key`` over the evaluations in the last ``fraction`` of the rounds, (H·(1−f), H].

    Args:
        metrics: a run's evaluations (dicts with ``round`` and ``key``), in round order.
        key: the metric, e.g. ``test_accuracy`` or ``validation_accuracy``.
        horizon: H, the run's last round (default: the last evaluated round).
        fraction: f in (0, 1]; 0.2 with H = 100 averages the evaluations of rounds 81-100.

    Returns:
        The arithmetic mean, a float in the metric's unit.

    Raises:
        ValueError: no evaluation holds ``key``, rounds out of order, f outside (0, 1], or no
        evaluation falls in the window (evaluate more often: ``eval_every``).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}")
    rounds, values = _series(metrics, key)
    horizon = rounds[-1] if horizon is None else int(horizon)
    start = horizon * (1.0 - fraction)
    window = [v for r, v in zip(rounds, values, strict=True) if start < r <= horizon]
    if not window:
        raise ValueError(f"no evaluation of {key!r} in rounds ({start:g}, {horizon}] (evaluated: {rounds[-3:]}...); "
                         "evaluate more often (eval_every)")
    return statistics.fmean(window)


def best_on_validation(metrics: Records, key: str = "test_accuracy") -> Mapping[str, Any] | None:
    """The evaluation with the highest ``validation_accuracy`` among those that also hold ``key`` (the first
    of equals): the only "best" the protocol allows, chosen on validation, never on the test set.

    Returns:
        That record of ``metrics``, or None when no evaluation holds both (no validation split).
    """
    records = [m for m in metrics if m.get("validation_accuracy") is not None and m.get(key) is not None]
    return max(records, key=lambda m: m["validation_accuracy"]) if records else None  # max keeps the first


def curve_area(metrics: Records, key: str = "test_accuracy", initial: float | None = None,
               horizon: int | None = None) -> float:
    """Area under the learning curve of ``key`` (trapezoids between evaluations) divided by its span.

    With ``initial`` (the untrained model's value, ``summary["initial"]``) the curve starts at round 0
    and the span is the horizon H, so the result is the run's average ``key`` over rounds [0, H];
    without it the curve starts at the first evaluation. Evaluations after ``horizon`` are ignored.

    Returns:
        A float in the metric's unit (an accuracy in [0, 1] for an accuracy).

    Raises:
        ValueError: no evaluation holds ``key`` (up to ``horizon``), rounds out of order, or a curve
        of one point (span 0).
    """
    rounds, values = _series(metrics, key)
    horizon = rounds[-1] if horizon is None else int(horizon)
    points = [(r, v) for r, v in zip(rounds, values, strict=True) if r <= horizon]
    if initial is not None:
        points.insert(0, (0, float(initial)))
    if len(points) < 2:
        raise ValueError(f"the learning curve of {key!r} has {len(points)} point(s) up to round {horizon}; need 2")
    area = sum((r1 - r0) * (v0 + v1) / 2 for (r0, v0), (r1, v1) in itertools.pairwise(points))
    return area / (points[-1][0] - points[0][0])


@dataclass(frozen=True)
class PairedDifference:
    """A − B paired by seed: ``mean`` difference, its 95% t-interval ``[low, high]`` (``half_width`` =
    t_{0.975, n−1} · s / √n), the paired t-test's two-sided ``p_value``, ``n`` pairs and the ``seeds``."""

    mean: float
    low: float
    high: float
    half_width: float
    p_value: float
    n: int
    seeds: tuple[int, ...]

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> PairedDifference:
    """Paired differences a[s] − b[s] over the seeds s of both, with a Student-t interval and test.

    Args:
        a, b: one metric per seed (seed -> value), e.g. GMA's and plain averaging's last-20% accuracy.
        confidence: the interval's level (0.95: t's 97.5% quantile with n − 1 degrees of freedom).

    Returns:
        A :class:`PairedDifference`; the p-value is scipy's ``ttest_rel`` (two-sided). With all
        differences equal the interval is that single point and the p-value is 0 (or 1 when 0).

    Raises:
        ValueError: the seeds differ, or fewer than 2 pairs.
    """
    from scipy.stats import t, ttest_rel  # scipy comes with scikit-learn

    if set(a) != set(b):
        raise ValueError(f"unpaired seeds: only in A {sorted(set(a) - set(b))}, only in B {sorted(set(b) - set(a))}")
    seeds = tuple(sorted(a))
    n = len(seeds)
    if n < 2:
        raise ValueError(f"a paired t-interval needs at least 2 seeds, got {n}")
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    half = float(t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    if sd == 0:
        p_value = 1.0 if mean == 0 else 0.0
    else:
        p_value = float(ttest_rel([float(a[s]) for s in seeds], [float(b[s]) for s in seeds]).pvalue)
    return PairedDifference(mean, mean - half, mean + half, half, p_value, n, seeds)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order.

    Sorted ascending p_(1) ≤ ... ≤ p_(m), the adjusted p_(i) is max_{j ≤ i} min(1, (m − j + 1) · p_(j)).
    Rejecting where the adjusted value is ≤ α controls the family-wise error rate at α over the m
    comparisons (e.g. the rows of one table). Equal to ``statsmodels.stats.multitest.multipletests``
    with ``method="holm"``.

    Raises:
        ValueError: a p-value outside [0, 1] or NaN.
    """
    values = [float(p) for p in p_values]
    for p in values:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p-values must lie in [0, 1], got {p!r}")
    m = len(values)
    adjusted = [0.0] * m
    running = 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: values[i])):
        running = max(running, min(1.0, (m - rank) * values[index]))
        adjusted[index] = running
    return adjusted


def holm_correct(differences: Mapping[str, PairedDifference], alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """A table's comparisons (name -> difference) with Holm-adjusted p-values: name -> ``{"p": raw,
    "p_holm": adjusted, "significant": p_holm ≤ alpha}``, in the input order."""
    names = list(differences)
    adjusted = holm([differences[n].p_value for n in names])
    return {n: {"p": differences[n].p_value, "p_holm": p, "significant": p <= alpha}
            for n, p in zip(names, adjusted, strict=True)}


def check_seeds(tuning: Sequence[int], evaluation: Sequence[int], min_tuning: int = 2,
                min_evaluation: int = 5) -> None:
    """Refuse a protocol whose tuning and evaluation seeds overlap or are too few.

    Raises:
        ValueError: fewer than ``min_tuning`` tuning or ``min_evaluation`` evaluation seeds, or a
        seed in both (a score on a seed the lr was chosen on is biased upward).
    """
    if len(set(tuning)) < min_tuning:
        raise ValueError(f"need at least {min_tuning} tuning seeds, got {sorted(set(tuning))}")
    if len(set(evaluation)) < min_evaluation:
        raise ValueError(f"need at least {min_evaluation} evaluation seeds, got {sorted(set(evaluation))}")
    shared = sorted(set(tuning) & set(evaluation))
    if shared:
        raise ValueError(f"seeds {shared} are both tuning and evaluation seeds; use disjoint seeds")


@dataclass(frozen=True)
class LrChoice:
    """The selected ``lr``, every lr's ``scores`` (mean over tuning seeds of last-20% validation
    accuracy), and ``edge``: "low" or "high" when the pick is the smallest or largest lr of the grid."""

    lr: float
    scores: dict[float, float]
    edge: str | None


def select_lr(runs: Mapping[float, Mapping[int, Records | None]], key: str = "validation_accuracy",
              fraction: float = LAST_FRACTION, min_seeds: int = 2) -> LrChoice:
    """Choose the server lr on validation: best mean over seeds of :func:`last_fraction_mean` of ``key``.

    Args:
        runs: lr -> seed -> that run's evaluations, or None for a run that diverged (scores 0).
        key: must be a validation metric; a test metric is refused (selection on the test set biases
            every number reported on it).
        fraction: the last fraction of rounds averaged (0.2).
        min_seeds: tuning seeds each lr needs (2).

    Returns:
        An :class:`LrChoice`; on a tie the smallest lr wins.

    Raises:
        ValueError: a test-set key, an empty grid, an lr with fewer than ``min_seeds`` seeds, or a run
        without ``key`` (tuning needs ``data.validation_fraction`` > 0).
    """
    if not key.startswith("validation"):
        raise ValueError(f"the server lr is chosen on validation only, not on {key!r}")
    if not runs:
        raise ValueError("no lr to choose from")
    scores: dict[float, float] = {}
    for lr in sorted(runs):
        by_seed = runs[lr]
        if len(by_seed) < min_seeds:
            raise ValueError(f"server lr {lr:g} has {len(by_seed)} tuning seed(s); need at least {min_seeds}")
        values = []
        for seed, metrics in sorted(by_seed.items()):
            if metrics is None:
                values.append(0.0)
                continue
            try:
                values.append(last_fraction_mean(metrics, key, fraction=fraction))
            except ValueError as error:
                raise ValueError(f"server lr {lr:g}, seed {seed}: {error} (tuning needs data.validation_fraction > 0)"
                                 ) from None
        scores[float(lr)] = statistics.fmean(values)
    best = max(scores, key=lambda lr: (scores[lr], -lr))
    grid = sorted(scores)
    edge = None if len(grid) < 2 else "low" if best == grid[0] else "high" if best == grid[-1] else None
    return LrChoice(best, scores, edge)


def run_metrics(metrics: Records, key: str = "test_accuracy", initial: float | None = None,
                target: float | None = None, horizon: int | None = None,
                fraction: float = LAST_FRACTION) -> dict[str, Any]:
    """The protocol's numbers for one run: ``last`` (mean over the last 20% of rounds), ``area`` (normalised
    area under the curve) and ``rounds_to_target`` (None if never reached or no ``target``)."""
    return {
        "last": last_fraction_mean(metrics, key, horizon, fraction),
        "area": curve_area(metrics, key, initial, horizon),
        "rounds_to_target": None if target is None else rounds_to_target(list(metrics), target, key),
    }
