"""Report plots (matplotlib, headless): accuracy curves, GMA's mask statistics, τ sweeps and GMA's gains."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from fedgma.report.groups import Group, extra_accuracies
from fedgma.report.runs import RunRecord
from fedgma.report.stats import mean_std, t_quantile
from fedgma.report.tables import number

#: The range of a fraction (mask density, agreement): intervals are cut to it.
UNIT = (0.0, 1.0)

__all__ = ["group_name", "layer_names", "plot_curves", "plot_gains", "plot_mask", "plot_tau"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(runs: list[RunRecord], key: str, source: str = "metrics") -> tuple[list[int], list[float], list[float]]:
    """Rounds, mean and the 95% Student-t half-width over runs (0 below two runs) of ``key`` (from
    metrics.jsonl or rounds.jsonl), by round."""
    values: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        records = run.metrics if source == "metrics" else run.rounds()
        for record in records:
            if key in record and record[key] is not None:
                values[int(record["round"])].append(float(record[key]))
    rounds = sorted(values)
    means, halves = [], []
    for r in rounds:
        mean, std = mean_std(values[r])
        n = len(values[r])
        means.append(mean)
        halves.append(t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else 0.0)
    return rounds, means, halves


def _band(ax: Any, runs: list[RunRecord], key: str, label: str, source: str = "metrics", scale: float = 1.0,
          bounds: tuple[float, float] | None = None, band: bool = True, **style: Any) -> None:
    """The mean of ``key`` over ``runs`` as a line, with its 95% interval over seeds shaded (cut to
    ``bounds``, e.g. 0-100 for an accuracy in %: two seeds give a t-interval 12.7 std wide)."""
    rounds, mean, half = _series(runs, key, source)
    if not rounds:
        return
    low_bound, high_bound = bounds or (-math.inf, math.inf)
    low = [max(low_bound, scale * (m - h)) for m, h in zip(mean, half, strict=True)]
    high = [min(high_bound, scale * (m + h)) for m, h in zip(mean, half, strict=True)]
    (line,) = ax.plot(rounds, [scale * m for m in mean], label=label, marker="o" if len(rounds) < 3 else None,
                      markersize=4, **style)
    if band and any(h > 0 for h in half):
        ax.fill_between(rounds, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def group_name(group: Group) -> str:
    """A legend label: the method (algorithm, aggregator, τ for GMA, every swept method key)."""
    return group.label or f"{group.algorithm} + {group.aggregator}"


def _seeds_text(groups: list[Group]) -> str:
    counts = sorted({len(g.runs) for g in groups})
    if counts == [1]:
        return "one seed each, no interval"
    shown = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
    return f"mean and 95% t-interval over {shown} seeds"


def plot_curves(groups: list[Group], path: Path, title: str) -> Path | None:
    """Accuracy versus round for every selected configuration, one panel per setting (and per accuracy:
    test, then out-of-distribution ones), one line per method with its 95% interval over seeds shaded.

    Any number of configurations (one included); the figure is sized for its panels and the shared
    legend sits below them, so it covers no data and no title is clipped. Returns ``path``, or None when
    no group has an evaluation.
    """
    groups = [g for g in groups if g.selected and any(r.metrics for r in g.runs)]
    if not groups:
        return None
    groups = sorted(groups, key=lambda g: (g.aggregator != "mean", g.aggregator, group_name(g)))  # mean: C0
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    settings = list(dict.fromkeys(g.setting for g in groups))
    extra = [k for k in extra_accuracies(groups, per_domain=False) if k != "validation_accuracy"]
    keys = ["test_accuracy", *extra]
    panels = [(setting, key) for setting in settings for key in keys]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    labels = list(dict.fromkeys(group_name(g) for g in groups))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    per_row = max(1, min(len(labels), 2 * ncols))
    legend_rows = math.ceil(len(labels) / per_row)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.4, 4.6 * ncols), 3.3 * nrows + 0.9 + 0.25 * legend_rows),
                             squeeze=False, layout="constrained")
    for ax, (setting, key) in zip(axes.flat, panels, strict=False):
        for group in (g for g in groups if g.setting == setting):
            _band(ax, group.runs, key, group_name(group), scale=100, bounds=(0, 100),
                  color=colours[group_name(group)])
        name = key.replace("_accuracy", "").replace("_", " ")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{setting or 'all runs'}" + ("" if len(keys) == 1 else f": {name}"), fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colours[label], linewidth=2) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=per_row, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: accuracy vs round ({_seeds_text(groups)})", fontsize=11, wrap=True)
    fig.savefig(path, dpi=100)
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
    from matplotlib.ticker import MaxNLocator

    sweep = len({g.threshold for g in groups}) > 2  # a τ sweep: one panel, one line per τ
    if sweep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
        for group in sorted(groups, key=lambda g: g.threshold or 0):
            _band(axes[0][0], group.runs, "mask_density", f"τ={group.threshold:g}", source="rounds", bounds=UNIT)
            _band(axes[0][1], group.runs, "mask_pass_fraction", f"τ={group.threshold:g}", source="rounds", bounds=UNIT)
        axes[0][0].set_ylabel("mask density (mean of mask)")
        axes[0][1].set_ylabel("fraction of coordinates with agreement ≥ τ")
        for ax in axes[0]:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(f"{title}: GMA mask over rounds (mean and 95% interval over seeds)", fontsize=11)
    else:
        groups = sorted(groups, key=lambda g: (g.algorithm, g.threshold or 0))
        fig, axes = plt.subplots(len(groups), 3, figsize=(14, 4.4 * len(groups)), squeeze=False,
                                 layout="constrained")
        for row, group in enumerate(groups):
            ax_density, ax_agree, ax_hist = axes[row]
            layers = _layers(group.runs[0])
            names = layer_names(layers)
            for layer in layers:  # per layer: the mean line only, so the bands do not hide each other
                _band(ax_density, group.runs, f"mask_density/{layer}", names[layer], source="rounds", bounds=UNIT,
                      linewidth=1, band=False)
            _band(ax_density, group.runs, "mask_density", "all coordinates", source="rounds", bounds=UNIT,
                  color="black", linewidth=2)
            ax_density.set_title(f"{group_name(group)}: mask density", fontsize=9)
            ax_density.set_ylabel("mean of mask")
            _band(ax_agree, group.runs, "agreement_mean", "mean agreement", source="rounds", bounds=UNIT)
            _band(ax_agree, group.runs, "mask_pass_fraction", "fraction with agreement ≥ τ", source="rounds",
                  bounds=UNIT)
            ax_agree.set_title("sign agreement (all coordinates)", fontsize=9)
            ax_agree.set_ylabel("fraction")
            for layer in layers:
                hist = _mean_histogram(group.runs, f"agreement_histogram/{layer}")
                if hist:
                    ax_hist.stairs(hist, [i / len(hist) for i in range(len(hist) + 1)], label=names[layer],
                                   linewidth=1.5)
            ax_hist.axvline(group.threshold or 0, color="red", linestyle="--", label=f"τ = {group.threshold:g}")
            ax_hist.set_title("agreement histogram per layer (all rounds and seeds)", fontsize=9)
            ax_hist.set_xlabel("sign agreement |mean sign|")
            ax_hist.set_ylabel("fraction of coordinates")
            for ax in (ax_density, ax_agree):
                ax.set_xlabel("round")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            for ax in (ax_density, ax_agree, ax_hist):
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, frameon=False)
        fig.suptitle(f"{title}: GMA mask statistics (mean and 95% interval over seeds)", fontsize=11)
    if sweep:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def layer_names(layers: list[str]) -> dict[str, str]:
    """Readable names of flat-vector layers: ``"1.weight"`` → ``"layer 1 weights"`` (layers numbered from 1 in
    order of first appearance of their module), ``"1.bias"`` → ``"layer 1 biases"``; other names stay."""
    modules = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in layers if "." in name))
    names = {}
    for name in layers:
        module, _, kind = name.rpartition(".")
        if not module:
            names[name] = name
            continue
        number = modules.index(module) + 1
        shown = {"weight": "weights", "bias": "biases"}.get(kind, kind.replace("_", " "))
        names[name] = f"layer {number} {shown}" + ("" if module.isdigit() else f" ({module})")
    return names


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
    """GMA − mean in accuracy points per setting (one row each) and method (one marker each), with the
    95% interval over paired seeds as an error bar (none for one seed), for the final test accuracy and,
    where measured, the out-of-distribution accuracy. Returns ``path``, or None without pairs."""
    if not rows:
        return None
    plt = _pyplot()
    keys = ["test_accuracy"] + (["ood_accuracy"] if any("gain_ood_accuracy" in r for r in rows) else [])
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(f"{r['algorithm']} + gma (τ={number(r['threshold'])})" for r in rows))
    height = 1.6 + 0.45 * len(settings) * max(1, len(methods)) ** 0.5
    fig, axes = plt.subplots(1, len(keys), figsize=(6.4 * len(keys), height + 0.3 * len(methods)),
                             squeeze=False, layout="constrained", sharey=True)
    offsets = [0.0] if len(methods) == 1 else [0.3 * (i / (len(methods) - 1) - 0.5) for i in range(len(methods))]
    for ax, key in zip(axes[0], keys, strict=True):
        for i, method in enumerate(methods):
            ys, xs, errs = [], [], []
            for j, setting in enumerate(settings):
                match = [r for r in rows if r["setting"] == setting and f"gain_{key}" in r
                         and f"{r['algorithm']} + gma (τ={number(r['threshold'])})" == method]
                if match:
                    gain = match[0][f"gain_{key}"]
                    ys.append(j + offsets[i])
                    xs.append(100 * gain["mean"])
                    errs.append(0.0 if math.isnan(gain["ci95"]) else 100 * gain["ci95"])
            if xs:
                ax.errorbar(xs, ys, xerr=errs, fmt="o", capsize=4, color=f"C{i}", label=method)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(settings)), [s or "all runs" for s in settings])
        ax.set_ylim(len(settings) - 0.5, -0.5)
        name = "final test accuracy" if key == "test_accuracy" else "final out-of-distribution accuracy"
        ax.set_xlabel(f"GMA − plain averaging, {name} (points)")
        ax.set_title(f"{name}: GMA's gain", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        low, high = ax.get_xlim()
        bound = 1.1 * max(abs(low), abs(high), 0.5)  # a margin: no marker on the frame
        ax.set_xlim(-bound, bound)  # 0 in the middle: gains right, losses left
    seeds = sorted({r["seeds"] for r in rows})
    shown = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    fig.legend(loc="outside lower center", ncols=min(len(methods), 3), fontsize=8, frameon=False)
    fig.suptitle(f"GMA − plain averaging, paired by seed (mean and 95% t-interval over {shown} seeds)", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
