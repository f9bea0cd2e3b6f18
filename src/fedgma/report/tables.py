"""Tables: one row per run label, per configuration (seeds pooled) and per GMA/mean pair; Markdown and CSV."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedgma.report.groups import Group, extra_accuracies, pair_groups
from fedgma.report.runs import RunRecord, group_runs
from fedgma.report.stats import gain_stats, mean_std, rounds_to_target

__all__ = [
    "gain_rows", "gains_markdown", "number", "percent", "summary_rows", "table_markdown", "table_rows", "write_csv",
]


def summary_rows(runs: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """One row per group: algorithm, aggregator, seeds, final and best test accuracy (mean, std)."""
    rows = []
    for label, group in group_runs(runs).items():
        first = group[0].summary
        final = [r.summary["final"]["test_accuracy"] for r in group]
        best = [r.summary["best"]["test_accuracy"] for r in group]
        row = {
            "run": label,
            "algorithm": first["algorithm"],
            "aggregator": first["aggregator"],
            "seeds": len(group),
            "final_accuracy": mean_std(final),
            "best_accuracy": mean_std(best),
            "wall_s": statistics.fmean(r.summary["wall_s"] for r in group),
        }
        finals = [r.summary["final"] for r in group]
        extra = sorted({k for f in finals for k in f if k.endswith("_accuracy") and k != "test_accuracy"})
        for key in extra:
            row[f"final_{key}"] = mean_std([r.summary["final"][key] for r in group if key in r.summary["final"]])
        rows.append(row)
    return rows


def table_rows(
    groups: list[Group], target_fraction: float = 0.95, target: float | None = None
) -> list[dict[str, Any]]:
    """One row per group: final/best test accuracy and other accuracies (mean, std over seeds), and the
    rounds each needs to reach a target accuracy.

    The target is ``target`` if given; otherwise, for a pair (plain averaging, GMA), ``target_fraction``
    × the mean final test accuracy of plain averaging, the same target for both rows of the pair.
    """
    extras = extra_accuracies(groups)
    pair_target: dict[int, float] = {}
    for base, gma_group in pair_groups(groups):
        level = target_fraction * statistics.fmean(base.final())
        pair_target[id(gma_group)] = level
        pair_target.setdefault(id(base), level)
    rows = []
    for group in groups:
        row: dict[str, Any] = {
            "setting": group.setting,
            "run": group.label.rsplit("/", 1)[-1],
            "algorithm": group.algorithm,
            "aggregator": group.aggregator,
            "threshold": group.threshold,
            "server_lr": group.server_lr,
            "selected": group.selected,
            "seeds": len(group.runs),
            "final_test_accuracy": mean_std(group.final()),
            "best_test_accuracy": mean_std(group.best()),
        }
        for key in extras:
            values = group.final(key)
            row[f"final_{key}"] = mean_std(values) if values else None
        level = target if target is not None else pair_target.get(id(group))
        row["target"] = level
        if level is not None:
            reached = [rounds_to_target(r.metrics, level) for r in group.runs]
            hits = [x for x in reached if x is not None]
            row["rounds_to_target"] = statistics.fmean(hits) if hits else None
            row["reached"] = f"{len(hits)}/{len(reached)}"
        else:
            row["rounds_to_target"], row["reached"] = None, ""
        row["wall_s"] = statistics.fmean(float(r.summary["wall_s"]) for r in group.runs)
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"], r["algorithm"], r["aggregator"] != "mean", r["threshold"] or 0,
                             r["server_lr"]))
    return rows


def gain_rows(groups: list[Group]) -> list[dict[str, Any]]:
    """GMA's gain over plain averaging, per setting and algorithm: gma − mean, paired by seed.

    For each accuracy (final test, best test, and any other such as ``ood_accuracy``) the gain is the
    per-seed difference (same seed ⇒ same partition, sampling and initial model), reported as mean,
    sample std and a 95% Student-t interval; ``verdict`` says whether that interval excludes 0.
    """
    rows = []
    for base, gma_group in pair_groups(groups):
        row: dict[str, Any] = {
            "setting": gma_group.setting,
            "algorithm": gma_group.algorithm,
            "threshold": gma_group.threshold,
            "lr_mean": base.server_lr,
            "lr_gma": gma_group.server_lr,
        }
        extra = extra_accuracies([base, gma_group], per_domain=False)
        keys = ["test_accuracy", *[k for k in extra if k != "validation_accuracy"]]
        for key in keys:
            a, b = base.by_seed(key), gma_group.by_seed(key)
            seeds = sorted(set(a) & set(b))
            diffs = [b[s] - a[s] for s in seeds]
            row[f"gain_{key}"] = gain_stats(diffs)
        best_a = {int(r.summary["seed"]): float(r.summary["best"]["test_accuracy"]) for r in base.runs}
        best_b = {int(r.summary["seed"]): float(r.summary["best"]["test_accuracy"]) for r in gma_group.runs}
        seeds = sorted(set(best_a) & set(best_b))
        row["gain_best_test_accuracy"] = gain_stats([best_b[s] - best_a[s] for s in seeds])
        row["seeds"] = len(seeds)
        row["verdict"] = row["gain_test_accuracy"]["verdict"]
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"], r["algorithm"], r["threshold"] or 0))
    return rows


def percent(value: tuple[float, float] | None) -> str:
    """``(mean, std)`` of fractions as ``"m ± s"`` in %, 2 decimals; ``""`` for None or NaN."""
    if value is None or math.isnan(value[0]):
        return ""
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def _gain_text(gain: dict[str, Any]) -> str:
    if gain["n"] == 0:
        return ""
    ci = "" if math.isnan(gain["ci95"]) else f" [{100 * (gain['mean'] - gain['ci95']):+.2f}, " \
                                              f"{100 * (gain['mean'] + gain['ci95']):+.2f}]"
    return f"{100 * gain['mean']:+.2f} ± {100 * gain['std']:.2f}{ci}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits; ``""`` for None or NaN."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The experiment table in Markdown; accuracies in %, mean ± std over seeds."""
    extras = sorted({k for r in rows for k in r if k.startswith("final_") and k.endswith("_accuracy")
                     and k != "final_test_accuracy" and r[k] is not None})
    header = ["setting", "algorithm", "aggregator", "τ", "server lr", "seeds", "final test acc %",
              "best test acc %", *[k.removeprefix("final_").replace("_accuracy", "") + " acc %" for k in extras],
              "target %", "rounds to target", "wall s"]
    body = []
    for r in rows:
        lr = number(r["server_lr"]) + ("" if r["selected"] else " (not selected)")
        rounds = ""
        if r["target"] is not None:
            reached = "—" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.0f}"
            rounds = f"{reached} ({r['reached']})"
        body.append([r["setting"] or ".", r["algorithm"], r["aggregator"], number(r["threshold"]), lr,
                     str(r["seeds"]), percent(r["final_test_accuracy"]), percent(r["best_test_accuracy"]),
                     *[percent(r.get(k)) for k in extras], "" if r["target"] is None else f"{100 * r['target']:.2f}",
                     rounds, f"{r['wall_s']:.0f}"])
    return _markdown(header, body)


def gains_markdown(rows: list[dict[str, Any]]) -> str:
    """GMA − mean in accuracy points: mean ± std over seeds [95% interval], and the verdict."""
    extras = sorted({k for r in rows for k in r if k.startswith("gain_") and k not in
                     {"gain_test_accuracy", "gain_best_test_accuracy"}})
    header = ["setting", "algorithm", "τ", "server lr (mean / gma)", "seeds", "Δ final test (pts)",
              "Δ best test (pts)", *[f"Δ {k.removeprefix('gain_').replace('_accuracy', '')} (pts)" for k in extras],
              "verdict (final test)"]
    body = [[r["setting"] or ".", r["algorithm"], number(r["threshold"]),
             f"{number(r['lr_mean'])} / {number(r['lr_gma'])}", str(r["seeds"]),
             _gain_text(r["gain_test_accuracy"]), _gain_text(r["gain_best_test_accuracy"]),
             *[_gain_text(r[k]) if k in r else "" for k in extras], r["verdict"]] for r in rows]
    return _markdown(header, body)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV; a (mean, std) pair becomes ``<key>_mean``/``<key>_std``, a gain dict its fields."""

    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                flat[f"{key}_mean"], flat[f"{key}_std"] = value
            elif isinstance(value, dict):
                for sub in ("mean", "std", "ci95", "n", "verdict"):
                    flat[f"{key}_{sub}"] = value[sub]
            else:
                flat[key] = value
        flat_rows.append(flat)
    fields: list[str] = []
    for flat in flat_rows:
        fields += [k for k in flat if k not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat_rows)
