"""Reports from run folders: read every run, group seeds, and tabulate mean ± std."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "RunRecord",
    "find_diverged",
    "find_runs",
    "group_runs",
    "load_run",
    "mean_std",
    "select_server_lr",
    "summary_rows",
]


@dataclass(frozen=True)
class RunRecord:
    """A finished run: where it is, its config, its evaluations and its summary."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]

    @property
    def label(self) -> str:
        """The run's identity without its seed: the folder name minus ``seedN``."""
        name = self.path.name
        head, _, tail = name.rpartition("seed")
        return head.rstrip("_") if tail.isdigit() and head else name


def load_run(path: str | Path) -> RunRecord:
    import tomllib

    path = Path(path)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunRecord(
        path,
        tomllib.loads((path / "config.toml").read_text()),
        metrics,
        json.loads((path / "summary.json").read_text()),
    )


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run folder (one holding ``summary.json``) under ``root``, in name order."""
    root = Path(root)
    return [load_run(p.parent) for p in sorted(root.rglob("summary.json"))]


def group_runs(runs: Iterable[RunRecord]) -> dict[str, list[RunRecord]]:
    """Runs grouped by label (same settings, different seeds)."""
    groups: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        groups[run.label].append(run)
    return dict(groups)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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


def find_diverged(root: str | Path) -> list[dict[str, Any]]:
    """Runs under ``root`` that stopped on a non-finite model (``diverged.json``), with their config."""
    import tomllib

    found = []
    for marker in sorted(Path(root).rglob("diverged.json")):
        config_path = marker.parent / "config.toml"
        config = tomllib.loads(config_path.read_text()) if config_path.is_file() else {}
        found.append({"path": marker.parent, "config": config, **json.loads(marker.read_text())})
    return found


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
        scores[pair][float(run.config["server"]["lr"])].append(float(run.summary["final"][metric]))
    for item in find_diverged(root):
        config = item["config"]
        if config:
            pair = (config["algorithm"], config["server"]["aggregator"])
            scores[pair][float(config["server"]["lr"])].append(0.0)
    if not scores:
        raise ValueError(f"no finished tuning runs under {root}")
    chosen = {}
    for pair, by_lr in scores.items():
        means = {lr: statistics.fmean(values) for lr, values in sorted(by_lr.items())}
        best = max(means, key=lambda lr: means[lr])  # first (smallest) lr wins a tie
        chosen[pair] = {"lr": best, "scores": means}
    return chosen
