"""Tables: one row per configuration (seeds pooled) and one per comparison with plain averaging; Markdown
and CSV.

The reported metric is issue 15's protocol (:mod:`fedgma.report.protocol`): test accuracy averaged over
the last 20% of the rounds, with the normalised area under the learning curve and the rounds to a target
beside it; the only "best" accuracy is the test accuracy where the validation accuracy was best. The
last round's test accuracy is an extra column, named so.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedgma.report.configs import format_value, headline_options, is_method_key, readable_name
from fedgma.report.groups import (
    Group,
    comparisons,
    extra_accuracies,
    make_groups,
    setting_keys,
    setting_rank,
    swept_keys,
)
from fedgma.report.protocol import LAST_FRACTION, holm, paired_difference
from fedgma.report.runs import RunRecord
from fedgma.report.stats import mean_std, rounds_to_target

__all__ = [
    "GAIN_COLUMNS", "gain_columns", "gain_rows", "gains_markdown", "number", "percent", "summary_rows",
    "table_columns", "table_markdown", "table_rows", "write_csv",
]


def _stats(by_seed: dict[int, float]) -> tuple[float, float] | None:
    return mean_std(list(by_seed.values())) if by_seed else None


#: GMA's per-round mask statistics (rounds.jsonl) that the experiment table averages over a run's rounds.
MASK_KEYS = ("mask_density", "mask_pass_fraction")


def mask_stats(group: Group, key: str) -> tuple[float, float] | None:
    """``key`` (a :data:`MASK_KEYS` statistic of rounds.jsonl) averaged over each run's rounds, then (mean, std)
    over the group's seeds; None when the runs log no such statistic (plain averaging, Krum, ...)."""
    per_run = []
    for run in group.runs:
        values = [float(r[key]) for r in run.rounds() if r.get(key) is not None]
        if values:
            per_run.append(statistics.fmean(values))
    return mean_std(per_run) if per_run else None


def summary_rows(runs: Iterable[RunRecord], fraction: float = LAST_FRACTION) -> list[dict[str, Any]]:
    """One row per configuration (:func:`~fedgma.report.groups.make_groups`): ``run`` (its setting and
    method label), algorithm, aggregator, seeds, test accuracy over the last ``fraction`` of rounds and at
    the final round (mean, std), wall seconds."""
    rows = []
    for group in make_groups(runs, fraction=fraction):
        row = {
            "run": " · ".join(part for part in (group.setting, group.label) if part),
            "algorithm": group.algorithm,
            "aggregator": group.aggregator,
            "seeds": len(group.runs),
            "last_test_accuracy": _stats(group.last()),
            "final_round_test_accuracy": mean_std(group.final()),
            "wall_s": statistics.fmean(float(r.summary["wall_s"]) for r in group.runs),
        }
        for key in extra_accuracies([group]):
            row[f"last_{key}"] = _stats(group.last(key))
        rows.append(row)
    return rows


def table_rows(
    groups: list[Group], target_fraction: float = 0.95, target: float | None = None
) -> list[dict[str, Any]]:
    """One row per group, accuracies as (mean, std) over seeds: ``last_test_accuracy`` (mean over the last
    20% of rounds, the reported metric), ``area_test_accuracy`` (normalised area under the curve),
    ``test_accuracy_at_best_validation`` (None without a validation split), ``final_round_test_accuracy``,
    ``last_<key>`` for every other accuracy, GMA's ``mask_density`` and ``mask_pass_fraction`` (each run's
    mean over its rounds, then mean and std over seeds; None for rules without a mask), and the rounds each
    needs to reach a target accuracy.

    The target is ``target`` if given; otherwise ``target_fraction`` × plain averaging's last-20% test
    accuracy in the same setting, the same target for every method compared with it
    (:func:`~fedgma.report.groups.comparisons`).
    """
    extras = extra_accuracies(groups)
    swept = swept_keys(groups)
    columns = sorted((k for k in swept if k not in _FIXED_COLUMNS), key=lambda k: (is_method_key(k), setting_rank(k)))
    pair_target: dict[int, float] = {}
    for base, other in comparisons(groups):
        level = target_fraction * statistics.fmean(base.last().values())
        pair_target[id(other)] = level
        pair_target.setdefault(id(base), level)
    rows = []
    for group in groups:
        choice = group.lr_choice
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
            "lr_edge": choice.edge if choice is not None and group.selected else None,
            "seeds": len(group.runs),
            "fraction": group.fraction,
            "last_test_accuracy": _stats(group.last()),
            "area_test_accuracy": _stats(group.area()),
            "test_accuracy_at_best_validation": _stats(group.at_best_validation()),
            "final_round_test_accuracy": mean_std(group.final()),
        }
        for key in MASK_KEYS:
            row[key] = mask_stats(group, key)
        for key in extras:
            row[f"last_{key}"] = _stats(group.last(key))
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


def agreement_count(tau: float, clients: int) -> int:
    """τ as a count: the smallest net number of agreeing clients |#positive − #negative| that reaches τ with
    ``clients`` clients in the round (unweighted agreement, no zero updates). With K clients the net count
    has K's parity, so it is the first of K mod 2, K mod 2 + 2, ... that is ≥ τ·K (τ = 0.4: 4 of 10, 3 of 5)."""
    return next(n for n in range(clients % 2, clients + 1, 2) if n >= tau * clients - 1e-9) if tau > 0 else 0


#: The columns of gains.csv after the setting's varying keys (readable names), in this order.
GAIN_COLUMNS = ("method", "baseline", "seeds", "difference", "ci_low", "ci_high", "p", "p_holm", "significant",
                "metric", "tau", "agreement_count", "lr_method", "lr_baseline", "note")


def gain_rows(groups: list[Group], alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every method against plain averaging (``mean``) in the same setting, paired by seed.

    One row per comparison (:func:`~fedgma.report.groups.comparisons`) and accuracy: test accuracy first,
    then any other (out-of-distribution, held-out clients; not validation, which chose the lr). The
    difference is method − mean of the mean over the last 20% of rounds, per seed (same seed ⇒ same
    partition, sampling and initial model): its mean, 95% Student-t interval ``ci_low``/``ci_high`` and
    paired t-test ``p`` (:func:`~fedgma.report.protocol.paired_difference`), in accuracy fractions like
    every accuracy of the run folders. ``p_holm`` is Holm's adjustment across all comparisons of one
    accuracy (one table), and ``significant`` is ``p_holm`` ≤ ``alpha``. A comparison with fewer than two
    paired seeds gets no interval and no p-value (``note`` says so) and is left out of the correction.

    Each row also holds ``config`` (the setting's varying keys by readable name), ``setting`` (the same as
    text), ``values`` (their raw values, and a swept part's headline options such as α, for the map
    figure), ``method`` and ``baseline`` (aggregators),
    ``tau`` and ``agreement_count`` (:func:`agreement_count`: the net number of agreeing clients,
    |#positive − #negative signs|, at which GMA's mask reaches 1), and each side's server lr.
    """
    pairs = comparisons(groups)
    keys = setting_keys([g for pair in pairs for g in pair])
    named = {k: readable_name(k, keys) for k in keys}
    # for the map: a swept part's headline options even where they do not vary (the α of "dirichlet" vs "iid")
    shown = [*keys, *(k for k in headline_options(k.removesuffix(".name") for k in keys if k.endswith(".name"))
                      if k not in keys)]
    folder = any(g.folder for pair in pairs for g in pair)
    rows = []
    for base, other in pairs:
        flat = other.flat
        config = {**({"folder": other.folder} if folder else {}),
                  **{named[k]: format_value(flat.get(k)) for k in keys}}
        tau = other.threshold
        clients = flat.get("server.clients_per_round")
        extra = extra_accuracies([base, other], per_domain=False)
        for key in ["test_accuracy", *[k for k in extra if k != "validation_accuracy"]]:
            a, b = other.last(key), base.last(key)
            if not a or not b:
                continue
            seeds = sorted(set(a) & set(b))
            unpaired = sorted(set(a) ^ set(b))
            label = {**config, **{readable_name(k, shown): format_value(flat.get(k)) for k in shown[len(keys):]
                                  if flat.get(k) is not None}}  # "partition=dirichlet, Dirichlet α=0.1"
            row: dict[str, Any] = {
                "setting": ", ".join(f"{name}={value}" for name, value in label.items() if value != "—")
                           or "all runs",
                "config": config,
                "values": {k: flat.get(k) for k in shown},
                "keys": keys,
                "algorithm": other.algorithm,
                "method": _method(other),
                "baseline": _method(base),
                "seeds": len(seeds),
                "difference": None, "ci_low": None, "ci_high": None, "p": None, "p_holm": None, "significant": None,
                "metric": key,
                "tau": tau,
                "agreement_count": agreement_count(tau, int(clients)) if tau is not None and clients else None,
                "lr_method": other.server_lr,
                "lr_baseline": base.server_lr,
                "fraction": other.fraction,
                "note": "",
            }
            if len(seeds) >= 2:
                diff = paired_difference({s: a[s] for s in seeds}, {s: b[s] for s in seeds})
                row.update(difference=diff.mean, ci_low=diff.low, ci_high=diff.high, p=diff.p_value)
            else:
                row["note"] = f"{len(seeds)} paired seed{'' if len(seeds) == 1 else 's'}: no interval"
                if seeds:
                    row["difference"] = a[seeds[0]] - b[seeds[0]]
            if unpaired:
                row["note"] = "; ".join(filter(None, [row["note"], f"unpaired seeds left out: {unpaired}"]))
            rows.append(row)
    by_metric: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["p"] is not None:
            by_metric[row["metric"]].append(row)
    for family in by_metric.values():
        for row, adjusted in zip(family, holm([r["p"] for r in family]), strict=True):
            row["p_holm"] = adjusted
            row["significant"] = adjusted <= alpha
    rows.sort(key=lambda r: (r["metric"] != "test_accuracy", r["metric"],
                             [_sortable(r["values"][k]) for k in keys], r["algorithm"], r["method"] != "gma",
                             r["method"], r["tau"] or 0))
    return rows


def _method(group: Group) -> str:
    """The aggregator with any of its options other than τ (which has its own column)."""
    options = {k.removeprefix("server.aggregator."): v for k, v in _options(group).items()}
    shown = ", ".join(f"{k}={format_value(v)}" for k, v in options.items())
    return group.aggregator + (f" ({shown})" if shown else "")


def _options(group: Group) -> dict[str, Any]:
    """The aggregator options of ``group`` that are swept (other than its name and τ)."""
    return {k: v for k, v in group.values.items() if k.startswith("server.aggregator.")
            and k not in ("server.aggregator.name", "server.aggregator.threshold") and v is not None}


def percent(value: tuple[float, float] | None, seeds: int = 2) -> str:
    """``(mean, std)`` of fractions as ``"m ± s"`` in %, 2 decimals (just ``"m"`` for one seed, whose std
    means nothing); ``""`` for None or NaN."""
    if value is None or math.isnan(value[0]):
        return ""
    if seeds < 2:
        return f"{100 * value[0]:.2f}"
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def number(value: float | None, digits: int = 4) -> str:
    """``value`` with ``digits`` significant digits; ``""`` for None or NaN."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def window(fraction: float) -> str:
    """``"last 20%"``: the protocol's window of rounds, as shown in headers."""
    return f"last {100 * fraction:g}%"


def _lr_cell(row: dict[str, Any]) -> str:
    text = number(row["server_lr"])
    if not row["selected"]:
        return text + " (not selected)"
    if row.get("lr_edge"):
        return text + f" (chosen, {'lowest' if row['lr_edge'] == 'low' else 'highest'} of grid)"
    return text


def table_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The experiment table as a header and text cells (shared by Markdown, HTML and the terminal): the
    sub-folder (if any), every swept config key by its readable name, the method, then the results:
    test accuracy over the last 20% of rounds (the reported metric), the area under the curve, test
    accuracy at the best validation accuracy, the final round's test accuracy, other accuracies (last
    20%), the target and the rounds to it."""
    extras = sorted({k for r in rows for k in r if k.startswith("last_") and k.endswith("_accuracy")
                     and k != "last_test_accuracy" and r[k] is not None})
    swept = list(dict.fromkeys(k for r in rows for k in r.get("config", {})))
    folder = any(r.get("folder") for r in rows)
    tau = any(r["threshold"] is not None for r in rows)
    best = any(r.get("test_accuracy_at_best_validation") for r in rows)
    masks = any(r.get("mask_density") for r in rows)
    last = window(rows[0]["fraction"] if rows else LAST_FRACTION)
    header = [*(["folder"] if folder else []), *swept, "algorithm", "aggregator", *(["τ"] if tau else []), "server lr",
              "seeds", f"test acc % ({last})", "test AUC %", *(["test acc % at best validation"] if best else []),
              "final-round test acc %",
              *[k.removeprefix("last_").replace("_accuracy", "").replace("_", " ") + f" acc % ({last})"
                for k in extras],
              *(["mask density", "mask pass %"] if masks else []),
              "target %", "rounds to target", "wall s"]
    body = []
    for r in rows:
        rounds = ""
        if r["target"] is not None:
            reached = "—" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.0f}"
            rounds = f"{reached} ({r['reached']})"
        seeds = r["seeds"]
        body.append([*([r.get("folder", "")] if folder else []), *[r.get("config", {}).get(k, "") for k in swept],
                     r["algorithm"], r["aggregator"], *([number(r["threshold"])] if tau else []), _lr_cell(r),
                     str(seeds), percent(r["last_test_accuracy"], seeds), percent(r["area_test_accuracy"], seeds),
                     *([percent(r["test_accuracy_at_best_validation"], seeds)] if best else []),
                     percent(r["final_round_test_accuracy"], seeds),
                     *[percent(r.get(k), seeds) for k in extras],
                     *([_mean_std_text(r.get("mask_density"), 1.0, 3, seeds),
                        _mean_std_text(r.get("mask_pass_fraction"), 100.0, 1, seeds)] if masks else []),
                     "" if r["target"] is None else f"{100 * r['target']:.2f}", rounds, f"{r['wall_s']:.0f}"])
    return header, body


def _mean_std_text(value: tuple[float, float] | None, scale: float, digits: int, seeds: int) -> str:
    """``mean ± std`` (scaled), the mean alone for one seed, empty for None."""
    if value is None:
        return ""
    mean = f"{scale * value[0]:.{digits}f}"
    return mean if seeds < 2 else f"{mean} ± {scale * value[1]:.{digits}f}"


def table_markdown(rows: list[dict[str, Any]]) -> str:
    """The experiment table in Markdown (:func:`table_columns`); accuracies in %, mean ± std over seeds."""
    return _markdown(*table_columns(rows))


def _points(value: float | None, sign: bool = True) -> str:
    return "" if value is None else f"{100 * value:{'+' if sign else ''}.2f}"


def _p(value: float | None) -> str:
    return "" if value is None else f"{value:.2g}" if value >= 0.001 else f"{value:.1e}"


def gain_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """A gains table (method − mean, accuracy in points) as a header and text cells: the setting's varying
    keys, method, baseline, τ and τ as a net count of agreeing clients (where a method has τ), the server lrs, seeds,
    the difference with its 95% interval, p, Holm's p and whether it is significant after Holm."""
    keys = list(dict.fromkeys(k for r in rows for k in r["config"]))
    tau = any(r["tau"] is not None for r in rows)
    count = any(r["agreement_count"] is not None for r in rows)
    header = [*keys, "method", "baseline", *(["τ"] if tau else []), *(["τ as net agreeing clients"] if count else []),
              "server lr (method / mean)", "seeds", "difference (points)", "95% interval", "p", "p (Holm)",
              "significant (Holm, 0.05)", "note"]
    body = []
    for r in rows:
        interval = "" if r["ci_low"] is None else f"[{_points(r['ci_low'])}, {_points(r['ci_high'])}]"
        significant = "" if r["significant"] is None else "yes" if r["significant"] else "no"
        body.append([*[r["config"].get(k, "") for k in keys], r["method"], r["baseline"],
                     *([number(r["tau"])] if tau else []), *([number(r["agreement_count"])] if count else []),
                     f"{number(r['lr_method'])} / {number(r['lr_baseline'])}", str(r["seeds"]),
                     _points(r["difference"]), interval, _p(r["p"]), _p(r["p_holm"]), significant, r["note"]])
    return header, body


def metric_name(key: str) -> str:
    """``"test accuracy"``, ``"holdout worst10 accuracy"``: an accuracy key as a heading."""
    return key.replace("_", " ").replace("/", " ")


def gains_markdown(rows: list[dict[str, Any]]) -> str:
    """The gains in Markdown: one table per accuracy (each its own Holm family), differences in points."""
    parts = []
    for key in dict.fromkeys(r["metric"] for r in rows):
        family = [r for r in rows if r["metric"] == key]
        last = window(family[0]["fraction"])
        parts.append(f"### {metric_name(key)} ({last} of rounds), method − mean\n\n" + _markdown(*gain_columns(family)))
    return "\n".join(parts)


def write_csv(path: Path, rows: list[dict[str, Any]], columns: Iterable[str] | None = None) -> None:
    """``rows`` as CSV: a (mean, std) pair becomes ``<key>_mean``/``<key>_std``, the ``config`` dict one
    column per key (first); ``columns``, if given, are the only other columns, in that order."""
    flat_rows = []
    for row in rows:
        flat: dict[str, Any] = dict(row.get("config", {}))
        for key, value in row.items():
            if columns is not None and key not in columns:
                continue
            if isinstance(value, tuple):
                flat[f"{key}_mean"], flat[f"{key}_std"] = value
            elif value is None and key.endswith("_accuracy"):
                flat[f"{key}_mean"] = flat[f"{key}_std"] = None
            elif isinstance(value, dict | list):
                continue
            else:
                flat[key] = value
        if columns is not None:
            flat = {**dict(row.get("config", {})), **{k: flat.get(k) for k in columns}}
        flat_rows.append(flat)
    fields: list[str] = []
    for flat in flat_rows:
        fields += [k for k in flat if k not in fields]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat_rows)
