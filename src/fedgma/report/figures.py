"""Report plots (matplotlib, headless): accuracy curves, GMA's mask statistics, τ sweeps and GMA's gains."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedgma.report.groups import Group, extra_accuracies
from fedgma.report.runs import RunRecord
from fedgma.report.stats import mean_std
from fedgma.report.tables import number

__all__ = ["group_name", "plot_curves", "plot_gains", "plot_mask", "plot_tau"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(runs: list[RunRecord], key: str, source: str = "metrics") -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and std over runs of ``key`` (from metrics.jsonl or rounds.jsonl), by round."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        records = run.metrics if source == "metrics" else run.rounds()
        for record in records:
            if key in record and record[key] is not None:
                values[int(record["round"])].append(float(record[key]))
    rounds = sorted(values)
    stats = [mean_std(values[r]) for r in rounds]
    return rounds, [m for m, _ in stats], [s for _, s in stats]


def _band(ax: Any, runs: list[RunRecord], key: str, label: str, source: str = "metrics", scale: float = 1.0,
          **style: Any) -> None:
    rounds, mean, std = _series(runs, key, source)
    if not rounds:
        return
    low = [scale * (m - s) for m, s in zip(mean, std, strict=True)]
    high = [scale * (m + s) for m, s in zip(mean, std, strict=True)]
    (line,) = ax.plot(rounds, [scale * m for m in mean], label=label, **style)
    ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def group_name(group: Group) -> str:
    """A legend label: algorithm, aggregator (τ for GMA) and server lr."""
    if group.aggregator == "gma":
        return f"{group.algorithm}+GMA (τ={group.threshold:g}, server lr {group.server_lr:g})"
    return f"{group.algorithm} (mean, server lr {group.server_lr:g})"


def plot_curves(pairs: list[tuple[Group, Group]], path: Path, title: str) -> Path:
    """Test (and out-of-distribution) accuracy versus round, mean ± std band over seeds, per algorithm."""
    plt = _pyplot()
    algorithms = sorted({gma_group.algorithm for _, gma_group in pairs})
    extra = [k for k in extra_accuracies([g for pair in pairs for g in pair], per_domain=False)
             if k != "validation_accuracy"]
    keys = ["test_accuracy", *extra]
    fig, axes = plt.subplots(len(keys), len(algorithms), figsize=(4.2 * len(algorithms), 3.4 * len(keys)),
                             squeeze=False, sharex=True)
    for col, algorithm in enumerate(algorithms):
        chosen = [pair for pair in pairs if pair[1].algorithm == algorithm]
        base = chosen[0][0]
        for row, key in enumerate(keys):
            ax = axes[row][col]
            _band(ax, base.runs, key, group_name(base), scale=100, color="tab:blue")
            for _, gma_group in chosen:
                _band(ax, gma_group.runs, key, group_name(gma_group), scale=100, color="tab:orange")
            ax.set_title(f"{algorithm}: {key.replace('_', ' ')}", fontsize=10)
            ax.set_ylabel(f"{key.replace('_accuracy', '')} accuracy (%)")
            ax.grid(alpha=0.3)
            if row == len(keys) - 1:
                ax.set_xlabel("round")
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: accuracy vs round (mean ± std over {len(base.runs)} seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _layers(run: RunRecord) -> list[str]:
    rounds = run.rounds()
    return [k.split("/", 1)[1] for k in rounds[0] if k.startswith("mask_density/")] if rounds else []


def _mean_histogram(runs: list[RunRecord], key: str) -> list[float]:
    """The agreement histogram ``key`` summed over rounds and runs, as fractions of coordinates per bin."""
    total: list[float] = []
    for run in runs:
        for record in run.rounds():
            counts = record.get(key)
            if counts:
                total = [a + b for a, b in zip(total, counts, strict=True)] if total else [float(c) for c in counts]
    norm = sum(total)
    return [c / norm for c in total] if norm else []


def plot_mask(groups: list[Group], path: Path, title: str) -> Path | None:
    """GMA's mask over rounds: density (all coordinates and per layer), mean agreement, and the histogram
    of agreement per layer (over all rounds and seeds, with τ marked). One row per GMA configuration."""
    groups = [g for g in groups if g.aggregator == "gma" and g.runs[0].rounds()]
    if not groups:
        return None
    plt = _pyplot()
    sweep = len({g.threshold for g in groups}) > 2  # a τ sweep: one panel, one line per τ
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
        for group in sorted(groups, key=lambda g: g.threshold or 0):
            _band(axes[0][0], group.runs, "mask_density", f"τ={group.threshold:g}", source="rounds")
            _band(axes[0][1], group.runs, "mask_pass_fraction", f"τ={group.threshold:g}", source="rounds")
        axes[0][0].set_ylabel("mask density (mean of mask)")
        axes[0][1].set_ylabel("fraction of coordinates with agreement ≥ τ")
        for ax in axes[0]:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"{title}: GMA mask over rounds (mean ± std over seeds)", fontsize=11)
    else:
        groups = sorted(groups, key=lambda g: (g.algorithm, g.threshold or 0))
        fig, axes = plt.subplots(len(groups), 3, figsize=(14, 3.4 * len(groups)), squeeze=False)
        for row, group in enumerate(groups):
            ax_density, ax_agree, ax_hist = axes[row]
            _band(ax_density, group.runs, "mask_density", "all coordinates", source="rounds", color="black")
            layers = _layers(group.runs[0])
            for layer in layers:
                _band(ax_density, group.runs, f"mask_density/{layer}", layer, source="rounds", linewidth=1)
            ax_density.set_title(f"{group_name(group)}: mask density", fontsize=9)
            ax_density.set_ylabel("mean of mask")
            _band(ax_agree, group.runs, "agreement_mean", "mean agreement", source="rounds")
            _band(ax_agree, group.runs, "mask_pass_fraction", "fraction with agreement ≥ τ", source="rounds")
            ax_agree.set_title("sign agreement", fontsize=9)
            ax_agree.set_ylabel("value")
            for layer in layers:
                hist = _mean_histogram(group.runs, f"agreement_histogram/{layer}")
                if hist:
                    ax_hist.stairs(hist, [i / len(hist) for i in range(len(hist) + 1)], label=layer, linewidth=1.5)
            ax_hist.axvline(group.threshold or 0, color="red", linestyle="--", label=f"τ = {group.threshold:g}")
            ax_hist.set_title("agreement histogram per layer (10 bins, all rounds)", fontsize=9)
            ax_hist.set_xlabel("sign agreement |mean sign|")
            ax_hist.set_ylabel("fraction of coordinates")
            for ax in (ax_density, ax_agree):
                ax.set_xlabel("round")
            for ax in (ax_density, ax_agree, ax_hist):
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6)
        fig.suptitle(f"{title}: GMA mask statistics (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_tau(family: list[Group], base: Group | None, path: Path, title: str) -> Path:
    """Final and best test accuracy versus GMA's threshold τ (mean ± std over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    taus = [g.threshold for g in family]
    keys = [("final", lambda g: g.final()), ("best", lambda g: g.best())]
    extra = [k for k in extra_accuracies(family, per_domain=False) if k != "validation_accuracy"]
    keys += [(f"final {k.replace('_accuracy', '')}", lambda g, k=k: g.final(k)) for k in extra]
    for label, values in keys:
        stats = [mean_std(values(g)) for g in family]
        ax.errorbar(taus, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                    label=f"{label} test accuracy" if "test" not in label and label in ("final", "best") else label)
    if base is not None:
        mean, std = mean_std(base.final())
        ax.axhline(100 * mean, color="gray", linestyle="--", label=f"plain averaging, final ({number(100 * mean)}%)")
    ax.set_xlabel("GMA threshold τ (τ = 0 is plain averaging)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}: {family[0].algorithm}+GMA, τ sweep (mean ± std over {len(family[0].runs)} seeds)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_gains(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """GMA − mean (points) per setting and algorithm, with 95% intervals: final test accuracy and, where
    measured, out-of-distribution accuracy. Pairs with a single seed (no interval) are left out."""
    rows = [r for r in rows if r["gain_test_accuracy"]["n"] >= 2]
    if not rows:
        return None
    plt = _pyplot()
    keys = ["test_accuracy"] + (["ood_accuracy"] if any("gain_ood_accuracy" in r for r in rows) else [])
    algorithms = sorted({r["algorithm"] for r in rows})
    width = 0.8 / len(algorithms)
    fig, axes = plt.subplots(len(keys), 1, figsize=(9, 3.6 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        settings = sorted({r["setting"] for r in rows if f"gain_{key}" in r})
        for i, algorithm in enumerate(algorithms):
            xs, ys, errs = [], [], []
            for j, setting in enumerate(settings):
                match = [r for r in rows if r["setting"] == setting and r["algorithm"] == algorithm
                         and f"gain_{key}" in r]
                if match:
                    gain = match[0][f"gain_{key}"]
                    xs.append(j + (i - (len(algorithms) - 1) / 2) * width)
                    ys.append(100 * gain["mean"])
                    errs.append(0.0 if math.isnan(gain["ci95"]) else 100 * gain["ci95"])
            if xs:
                ax.bar(xs, ys, width, yerr=errs, capsize=3, label=algorithm,
                       color=f"C{i}", edgecolor="black", linewidth=0.5)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(settings)), [s or "." for s in settings])
        ax.set_xlabel("setting")
        name = "final test accuracy" if key == "test_accuracy" else "final out-of-distribution accuracy"
        ax.set_ylabel("GMA − mean (points)")
        ax.set_title(f"GMA's gain over plain averaging: {name} (mean over seeds, 95% interval)", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
