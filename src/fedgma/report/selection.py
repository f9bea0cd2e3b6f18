"""Server learning rates chosen on the validation split (never the test set), per algorithm and aggregator."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from fedgma.report.groups import Group
from fedgma.report.protocol import LAST_FRACTION, select_lr
from fedgma.report.runs import find_diverged, find_runs, part_name

__all__ = ["lr_selection", "lr_selection_columns", "select_server_lr"]


def select_server_lr(
    root: str | Path, metric: str = "validation_accuracy", fraction: float = LAST_FRACTION
) -> dict[tuple[str, str], dict[str, Any]]:
    """For each (algorithm, aggregator) under ``root``, the server lr chosen by
    :func:`~fedgma.report.protocol.select_lr`: the best mean over seeds of ``metric`` averaged over the
    last ``fraction`` of rounds.

    This is how a tuning sweep chooses the server learning rate: on the validation split held out of the
    clients' data (``data.validation_fraction``), never on the test set. A diverged run scores 0.
    Returns ``{(algorithm, aggregator): {"lr": best, "scores": {lr: mean metric}, "edge": "low"/"high"/None}}``.

    Raises:
        ValueError: no finished run, a test-set ``metric``, or a run without ``metric``.
    """
    runs: dict[tuple[str, str], dict[float, dict[int, Any]]] = defaultdict(lambda: defaultdict(dict))
    for run in find_runs(root):
        pair = (run.summary["algorithm"], run.summary["aggregator"])
        runs[pair][_server_lr(run.config, run.path)][int(run.summary["seed"])] = run.metrics
    for item in find_diverged(root):
        config = item["config"]
        if config:
            pair = (config["algorithm"], part_name(config, "server.aggregator"))
            runs[pair][_server_lr(config, item["path"])][int(config.get("seed", 0))] = None
    if not runs:
        raise ValueError(f"no finished tuning runs under {root}")
    chosen = {}
    for pair, by_lr in runs.items():
        choice = select_lr(by_lr, metric, fraction=fraction, min_seeds=1)
        chosen[pair] = {"lr": choice.lr, "scores": choice.scores, "edge": choice.edge}
    return chosen


def lr_selection(groups: list[Group]) -> list[dict[str, Any]]:
    """Every server-lr choice the report made (:func:`~fedgma.report.groups.make_groups`): ``setting``,
    ``method``, ``scores`` (lr -> validation accuracy over the last 20% of rounds, mean over seeds; a
    diverged run scores 0), the ``chosen`` lr, ``edge`` ("low"/"high" when the pick is the smallest or
    largest lr of the grid: widen it) and the fewest ``seeds`` of any lr."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.lr_choice is not None:
            families[group.lr_key()].append(group)
    rows = []
    for family in families.values():
        first = family[0]
        method = f"{first.algorithm} + {first.aggregator}"
        if first.threshold is not None:
            method += f" (τ={first.threshold:g})"
        choice = first.lr_choice
        rows.append({"setting": first.setting, "method": method,
                     "scores": {f"{lr:g}": score for lr, score in sorted(choice.scores.items())},
                     "chosen": choice.lr, "edge": choice.edge, "seeds": first.lr_seeds})
    rows.sort(key=lambda r: (r["setting"], r["method"]))
    return rows


def lr_selection_columns(rows: list[dict[str, Any]], fraction: float) -> tuple[list[str], list[list[str]]]:
    """The server-lr choices as a header and text cells; validation accuracy in %."""
    header = ["setting", "method", f"validation acc % (last {100 * fraction:g}%) per server lr", "chosen lr",
              "edge of grid", "seeds per lr"]
    body = [[r["setting"] or "all runs", r["method"],
             ", ".join(f"{lr}: {100 * score:.2f}" for lr, score in r["scores"].items()), f"{r['chosen']:g}",
             {"low": "lowest lr: widen the grid down", "high": "highest lr: widen the grid up"}.get(r["edge"], "no"),
             str(r["seeds"]) + (" (protocol: ≥ 2)" if r["seeds"] < 2 else "")] for r in rows]
    return header, body


def _server_lr(config: dict[str, Any], where: Path) -> float:
    lr = config.get("server", {}).get("optimizer", {}).get("lr")
    if lr is None:
        raise ValueError(f"run {where}: config.toml has no server.optimizer.lr (nor server.lr)")
    return float(lr)
