"""Statistics over seeds: mean ± std, Student-t intervals of paired gains, rounds to a target accuracy."""

from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["gain_stats", "mean_std", "rounds_to_target", "t_quantile"]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (for a 95% interval)."""
    if dof < 1:
        return float("nan")
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(0.975, dof))


def gain_stats(diffs: list[float]) -> dict[str, Any]:
    """Paired differences ``diffs`` summarised: ``mean``, sample ``std``, the 95% Student-t half-width
    ``ci95`` (NaN below two values), ``n``, the ``verdict`` (does the interval exclude 0?) and ``diffs``."""
    mean, std = mean_std(diffs)
    n = len(diffs)
    half = t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    if n < 2:
        verdict = "one seed"
    elif mean - half > 0:
        verdict = "gma better"
    elif mean + half < 0:
        verdict = "gma worse"
    else:
        verdict = "within noise"
    return {"mean": mean, "std": std, "ci95": half, "n": n, "verdict": verdict, "diffs": diffs}


def rounds_to_target(metrics: list[dict[str, Any]], target: float, key: str = "test_accuracy") -> int | None:
    """The first evaluated round whose ``key`` is ≥ ``target`` (None if never)."""
    for record in metrics:
        if key in record and record[key] >= target:
            return int(record["round"])
    return None
