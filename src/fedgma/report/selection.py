"""Server learning rates chosen on the validation split (never the test set), per algorithm and aggregator."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedgma.report.groups import Group
from fedgma.report.runs import find_diverged, find_runs, part_name

__all__ = ["lr_selection", "select_server_lr"]


def select_server_lr(
    root: str | Path, metric: str = "validation_accuracy"
) -> dict[tuple[str, str], dict[str, Any]]:
    """For each (algorithm, aggregator) under ``root``, the server lr with the best mean final ``metric``.

    This is how the suite tunes the server learning rate: on the validation split held out of the
    clients' data (``data.validation_fraction``), never on the test set. A diverged run scores 0.
    Returns ``{(algorithm, aggregator): {"lr": best, "scores": {lr: mean metric}}}``.
    """
    scores: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in find_runs(root):
        if metric not in run.summary["final"]:
            raise ValueError(
                f"run {run.path} has no final {metric!r}; tuning needs data.validation_fraction > 0"
            )
        pair = (run.summary["algorithm"], run.summary["aggregator"])
        scores[pair][_server_lr(run.config, run.path)].append(float(run.summary["final"][metric]))
    for item in find_diverged(root):
        config = item["config"]
        if config:
            pair = (config["algorithm"], part_name(config, "server.aggregator"))
            scores[pair][_server_lr(config, item["path"])].append(0.0)
    if not scores:
        raise ValueError(f"no finished tuning runs under {root}")
    chosen = {}
    for pair, by_lr in scores.items():
        means = {lr: statistics.fmean(values) for lr, values in sorted(by_lr.items())}
        best = max(means, key=lambda lr: means[lr])  # first (smallest) lr wins a tie
        chosen[pair] = {"lr": best, "scores": means}
    return chosen


def lr_selection(groups: list[Group]) -> dict[str, Any]:
    """Per lr family with several server lrs: the validation score of each lr and the one selected."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        families[group.lr_key()].append(group)
    selection: dict[str, Any] = {}
    for family in families.values():
        if len(family) < 2:
            continue
        first = family[0]
        name = f"{first.setting or '.'}: {first.algorithm}+{first.aggregator}"
        if first.aggregator == "gma":
            name += f" (τ={first.threshold:g})"
        selection[name] = {
            "validation_accuracy": {f"{g.server_lr:g}": statistics.fmean(g.final("validation_accuracy"))
                                    for g in family if g.final("validation_accuracy")},
            "selected": [g.server_lr for g in family if g.selected],
        }
    return selection


def _server_lr(config: dict[str, Any], where: Path) -> float:
    lr = config.get("server", {}).get("optimizer", {}).get("lr")
    if lr is None:
        raise ValueError(f"run {where}: config.toml has no server.optimizer.lr (nor server.lr)")
    return float(lr)
