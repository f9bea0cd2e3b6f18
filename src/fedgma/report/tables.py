"""Tables: one row per run label, per configuration (seeds pooled) and per GMA/mean pair; Markdown and CSV."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedgma.report.configs import format_value, is_method_key, readable_name
from fedgma.report.groups import Group, extra_accuracies, make_groups, pair_groups, swept_keys
from fedgma.report.runs import RunRecord
from fedgma.report.stats import gain_stats, mean_std, rounds_to_target

__all__ = [
    "gain_columns", "gain_rows", "gains_markdown", "number", "percent", "summary_rows", "table_columns",
    "table_markdown", "table_rows", "write_csv",
]


def summary_rows(runs: Iterable[RunRecord]) -> list[dict[str, Any]]:
    """One row per configuration (:func:`~fedgma.report.groups.make_groups`): ``run`` (its setting and
    method label), algorithm, aggregator, seeds, final and best test accuracy (mean, std), wall seconds."""
    rows = []
    for group in make_groups(runs):
        row = {
            "run": " · ".join(part for part in (group.setting, group.label) if part),
            "algorithm": group.algorithm,
            "aggregator": group.aggregator,
            "seeds": len(group.runs),
            "final_accuracy": mean_std(group.final()),
            "best_accuracy": mean_std(group.best()),
            "wall_s": statistics.fmean(float(r.summary["wall_s"]) for r in group.runs),
        }
        for key in extra_accuracies([group]):
            row[f"final_{key}"] = mean_std(group.final(key))
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
    swept = swept_keys(groups)
    columns = [k for k in swept if k not in _FIXED_COLUMNS]
    pair_target: dict[int, float] = {}
    for base, gma_group in pair_groups(groups):
        level = target_fraction * statistics.fmean(base.final())
        pair_target[id(gma_group)] = level
        pair_target.setdefault(id(base), level)
    rows = []
    for group in groups:
        row: dict[str, Any] = {
            "setting": group.setting,
            "folder": group.folder,
            "label": group.label,
            "config": {readable_name(k, swept): format_value(group.values.get(k)) for k in columns},
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
    order = {id(g): (g.folder, [_sortable(g.values.get(k)) for k in swept if not is_method_key(k)]) for g in groups}
    keyed = sorted(zip(groups, rows, strict=True), key=lambda gr: (
        order[id(gr[0])], gr[1]["algorithm"], gr[1]["aggregator"] != "mean", gr[1]["aggregator"],
        gr[1]["threshold"] or 0, gr[1]["server_lr"], gr[1]["label"]))
    return [row for _, row in keyed]


#: Swept keys that have their own fixed column in the tables.
_FIXED_COLUMNS = ("algorithm", "server.aggregator.name", "server.aggregator.threshold", "server.optimizer.lr")


def _sortable(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order before anything else in text order."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


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


def percent(value: tuple[float, float] | None, seeds: int = 2) -> str:
    """``(mean, std)`` of fractions as ``"m ± s"`` in %, 2 decimals (just ``"m"`` for one seed, whose std
    means nothing); ``""`` for None or NaN."""
    if value is None or math.isnan(value[0]):
        return ""
    if seeds < 2:
        return f"{100 * value[0]:.2f}"
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def _gain_text(gain: dict[str, Any]) -> str:
    if gain["n"] == 0:
        return ""
    if gain["n"] == 1:
        return f"{100 * gain['mean']:+.2f}"
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


def table_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The experiment table as a header and text cells (shared by Markdown, HTML and the terminal): the
    sub-folder (if any), every swept config key by its readable name, the method, then the results."""
    extras = sorted({k for r in rows for k in r if k.startswith("final_") and k.endswith("_accuracy")
                     and k != "final_test_accuracy" and r[k] is not None})
    swept = list(dict.fromkeys(k for r in rows for k in r.get("config", {})))
    folder = any(r.get("folder") for r in rows)
    gma = any(r["aggregator"] == "gma" for r in rows)
    header = [*(["folder"] if folder else []), *swept, "algorithm", "aggregator", *(["τ"] if gma else []), "server lr",
              "seeds", "final test acc %", "best test acc %",
              *[k.removeprefix("final_").replace("_accuracy", "") + " acc %" for k in extras],
              "target %", "rounds to target", "wall s"]
    body = []
    for r in rows:
        lr = number(r["server_lr"]) + ("" if r["selected"] else " (not selected)")
        rounds = ""
        if r["target"] is not None:
            reached = "—" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.0f}"
            rounds = f"{reached} ({r['reached']})"
        seeds = r["seeds"]
        body.append([*([r.get("folder", "")] if folder else []), *[r.get("config", {}).get(k, "") for k in swept],
                     r["algorithm"], r["aggregator"], *([number(r["threshold"])] if gma else []), lr, str(seeds),
                     percent(r["final_test_accuracy"], seeds), percent(r["best_test_accuracy"], seeds),
                     *[percent(r.get(k), seeds) for k in extras],
                     "" if r["target"] is None else f"{100 * r['target']:.2f}", rounds, f"{r['wall_s']:.0f}"])
    return header, body


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The experiment table in Markdown (:func:`table_columns`); accuracies in %, mean ± std over seeds."""
    return _markdown(*table_columns(rows))


def gain_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The gains table (GMA − mean in accuracy points) as a header and text cells."""
    extras = sorted({k for r in rows for k in r if k.startswith("gain_") and k not in
                     {"gain_test_accuracy", "gain_best_test_accuracy"}})
    header = ["setting", "algorithm", "τ", "server lr (mean / gma)", "seeds", "Δ final test (pts)",
              "Δ best test (pts)", *[f"Δ {k.removeprefix('gain_').replace('_accuracy', '')} (pts)" for k in extras],
              "verdict (final test)"]
    body = [[r["setting"] or "all runs", r["algorithm"], number(r["threshold"]),
             f"{number(r['lr_mean'])} / {number(r['lr_gma'])}", str(r["seeds"]),
             _gain_text(r["gain_test_accuracy"]), _gain_text(r["gain_best_test_accuracy"]),
             *[_gain_text(r[k]) if k in r else "" for k in extras], r["verdict"]] for r in rows]
    return header, body


def gains_markdown(rows: list[dict[str, Any]]) -> str:
    """GMA − mean in accuracy points: mean ± std over seeds [95% interval], and the verdict."""
    return _markdown(*gain_columns(rows))


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as CSV; a (mean, std) pair becomes ``<key>_mean``/``<key>_std``, a gain dict its fields."""

    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, tuple):
                flat[f"{key}_mean"], flat[f"{key}_std"] = value
            elif isinstance(value, dict) and "verdict" not in value:  # the swept config values: one column each
                flat.update(value)
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
