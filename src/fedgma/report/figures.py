"""Report plots (matplotlib, headless): accuracy curves, GMA's mask statistics, τ sweeps, every method's gain
over plain averaging, and the map of GMA's gain over the settings."""

from __future__ import annotations

import functools
import math
import textwrap
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from fedgma.report.configs import format_value, readable_name
from fedgma.report.groups import Group, extra_accuracies
from fedgma.report.runs import RunRecord
from fedgma.report.stats import mean_std, t_quantile
from fedgma.report.tables import number

P = ParamSpec("P")
R = TypeVar("R")

#: The range of a fraction (mask density, agreement): intervals are cut to it.
UNIT = (0.0, 1.0)

__all__ = ["group_name", "layer_names", "plot_curves", "plot_gain_map", "plot_gains", "plot_mask", "plot_tau"]


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters, broken at spaces only (a folder name such as
    ``dirichlet-alpha0.1-min_size10`` stays whole unless it is longer than a line)."""
    return textwrap.wrap(text, width, break_on_hyphens=False)


def _fill(text: str, width: int) -> str:
    return "\n".join(_wrap(text, width))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _literal_text(plot: Callable[P, R]) -> Callable[P, R]:
    """Draw ``plot``'s figure with mathtext off: its titles and labels hold --title, folder names and config
    values, in which a pair of ``$`` is text (``$\\frac{$`` would otherwise stop the report with a parse error)."""

    @functools.wraps(plot)
    def draw(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return draw


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


@_literal_text
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
    palette = plt.get_cmap("tab20") if len(labels) > 10 else None  # more than 10 lines: no colour twice (up to 20)
    colours = {label: palette(i % 20) if palette else f"C{i}" for i, label in enumerate(labels)}
    width = max(6.4, 4.6 * ncols)
    # legend entries per row: as many as fit the figure's width (8-point text ≈ 0.065 in a character,
    # plus the line handle and spacing), so a long label is never cut at the figure's edge
    entry = 0.065 * max(len(label) for label in labels) + 0.6
    per_row = max(1, min(len(labels), 2 * ncols, int(width // entry)))
    legend_rows = math.ceil(len(labels) / per_row)
    titles = {setting: _fill(setting or "all runs", 55) for setting in settings}  # ≈ a panel's width
    title_lines = max(t.count("\n") + 1 for t in titles.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, (3.3 + 0.2 * (title_lines - 1)) * nrows + 0.9
                                                    + 0.25 * legend_rows), squeeze=False, layout="constrained")
    for ax, (setting, key) in zip(axes.flat, panels, strict=False):
        for group in (g for g in groups if g.setting == setting):
            _band(ax, group.runs, key, group_name(group), scale=100, bounds=(0, 100),
                  color=colours[group_name(group)])
        name = key.replace("_accuracy", "").replace("_", " ")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(titles[setting] + ("" if len(keys) == 1 else f": {name}"), fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=colours[label], linewidth=2) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=per_row, fontsize=8, frameon=False)
    # wrapped here, not with wrap=True: matplotlib measures wrapped text as mathtext whatever parse_math says
    suptitle = _fill(f"{title}: accuracy vs round ({_seeds_text(groups)})", int(width / 0.09))  # 11 pt
    fig.suptitle(suptitle, fontsize=11)
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


@_literal_text
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
        axes[0][0].set_title("mask density (mean of the mask)", fontsize=9)
        axes[0][0].set_ylabel("mask density")
        axes[0][1].set_title("pass rate: fraction of coordinates with agreement ≥ τ", fontsize=9)
        axes[0][1].set_ylabel("fraction of coordinates")
        for ax in axes[0]:
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        fig.suptitle(_fill(f"{title}: GMA mask over rounds (mean and 95% interval over seeds)", 120),
                     fontsize=11)  # 11 in wide
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
            ax_density.set_title(_fill(f"{group_name(group)}: mask density", 70), fontsize=9)
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
        fig.suptitle(_fill(f"{title}: GMA mask statistics (mean and 95% interval over seeds)", 155),
                     fontsize=11)  # 14 in wide
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


@_literal_text
def plot_tau(family: list[Group], base: Group | None, path: Path, title: str) -> Path:
    """Test accuracy over the last 20% of rounds (and at the best validation accuracy, where there is a
    validation split) versus GMA's threshold τ, mean ± std over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    taus = [g.threshold for g in family]
    last = f"last {100 * family[0].fraction:g}%"
    keys = [(f"test accuracy ({last})", lambda g: g.last()),
            ("test accuracy at best validation", lambda g: g.at_best_validation())]
    extra = [k for k in extra_accuracies(family, per_domain=False) if k != "validation_accuracy"]
    keys += [(f"{k.replace('_accuracy', '').replace('_', ' ')} accuracy ({last})", lambda g, k=k: g.last(k))
             for k in extra]
    for label, values in keys:
        stats = [mean_std(list(values(g).values())) for g in family]
        if all(math.isnan(m) for m, _ in stats):
            continue
        ax.errorbar(taus, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                    label=label)
    if base is not None:
        mean, _ = mean_std(list(base.last().values()))
        ax.axhline(100 * mean, color="gray", linestyle="--", label=f"plain averaging ({last}: {number(100 * mean)}%)")
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


def _method_name(row: dict[str, Any]) -> str:
    return row["method"] + ("" if row["tau"] is None else f" (τ={number(row['tau'])})")


def _seed_range(rows: list[dict[str, Any]]) -> str:
    seeds = sorted({r["seeds"] for r in rows})
    return f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"


@_literal_text
def plot_gains(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Every method − plain averaging in accuracy points per setting (one row each) and method (one marker
    each), with the 95% interval over paired seeds as an error bar (none below two seeds), one panel per
    accuracy (test first). Filled markers: significant after Holm's correction. Returns ``path``, or None
    without comparisons."""
    rows = [r for r in rows if r["difference"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    keys = list(dict.fromkeys(r["metric"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = list(dict.fromkeys(_method_name(r) for r in rows))
    short, base = _deviations(rows)
    labels = ["\n".join(_wrap(short[s], 42)) for s in settings]
    height = 1.6 + sum(0.28 + 0.12 * (label.count("\n") + 1) for label in labels) * max(1, len(methods)) ** 0.25
    fig, axes = plt.subplots(1, len(keys), figsize=(max(9.0, 3 + 5.5 * len(keys)), height + 0.3 * len(methods)),
                             squeeze=False, layout="constrained", sharey=True)
    offsets = [0.0] if len(methods) == 1 else [0.3 * (i / (len(methods) - 1) - 0.5) for i in range(len(methods))]
    last = f"last {100 * rows[0]['fraction']:g}% of rounds"
    for ax, key in zip(axes[0], keys, strict=True):
        for i, method in enumerate(methods):
            for j, setting in enumerate(settings):
                match = [r for r in rows if r["setting"] == setting and r["metric"] == key
                         and _method_name(r) == method]
                for row in match:
                    x = 100 * row["difference"]
                    err = None if row["ci_low"] is None else [[x - 100 * row["ci_low"]], [100 * row["ci_high"] - x]]
                    ax.errorbar([x], [j + offsets[i]], xerr=err, fmt="o", capsize=4, color=f"C{i}",
                                markerfacecolor=f"C{i}" if row["significant"] else "white")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(settings)), labels, fontsize=8)
        ax.set_ylim(len(settings) - 0.5, -0.5)
        ax.set_xlabel("method − plain averaging (points)")
        ax.set_title(f"{key.replace('_', ' ')} ({last})", fontsize=10)
        ax.grid(alpha=0.3, axis="x")
        low, high = ax.get_xlim()
        bound = 1.1 * max(abs(low), abs(high), 0.5)  # a margin: no marker on the frame
        ax.set_xlim(-bound, bound)  # 0 in the middle: gains right, losses left
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=f"C{i}") for i in range(len(methods))]
    fig.legend(handles, methods, loc="outside lower center", ncols=min(len(methods), 3), fontsize=8, frameon=False)
    title = (f"Each method − plain averaging, paired by seed: mean and 95% t-interval over {_seed_range(rows)} "
             "seeds (filled: significant after Holm)")
    if base:
        title += "\n" + _fill(f"settings named by how they differ from the base setting ({base})", 120)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _deviations(rows: list[dict[str, Any]]) -> tuple[dict[str, str], str]:
    """Short names of the settings of ``rows``: only the keys whose value is not the most common one
    ("clients per round=20"; "base setting" for none), and the base setting (every key's most common value)
    as text. With fewer than three settings the full names are short enough and are kept."""
    settings = {r["setting"]: r["config"] for r in rows}
    if len(settings) < 3:
        return {s: s for s in settings}, ""
    names = list(dict.fromkeys(k for config in settings.values() for k in config))
    mode = {}
    for name in names:
        counts: dict[str, int] = defaultdict(int)
        for config in settings.values():
            counts[config.get(name, "—")] += 1
        mode[name] = max(counts, key=lambda v: (counts[v], v))
    short = {s: ", ".join(f"{n}={config.get(n, '—')}" for n in names
                          if config.get(n, "—") != mode[n] and config.get(n, "—") != "—") or "base setting"
             for s, config in settings.items()}
    return short, ", ".join(f"{n}={v}" for n, v in mode.items() if v != "—")


#: The map's preferred axes, in order: x, one line each, one panel each.
_MAP_AXES = ("data.partition", "server.clients_per_round", "client.local_epochs")


def _partition(values: dict[str, Any]) -> str:
    name = values.get("data.partition.name")
    options = {k.removeprefix("data.partition."): v for k, v in values.items()
               if k.startswith("data.partition.") and k != "data.partition.name" and v is not None}
    if name in (None, "dirichlet") and "alpha" in options:
        rest = {k: v for k, v in options.items() if k != "alpha"}
        text = f"Dirichlet α={format_value(options['alpha'])}"
    else:
        rest = options
        text = "IID" if name == "iid" else str(name)
    return text + "".join(f", {k.replace('_', ' ')} {format_value(v)}" for k, v in rest.items())


def _partition_order(text: str, values: dict[str, Any]) -> tuple:
    """Increasing heterogeneity: IID, then Dirichlet by decreasing α, then anything else by name."""
    name, alpha = values.get("data.partition.name"), values.get("data.partition.alpha")
    if name == "iid":
        return (0, 0.0, text)
    if alpha is not None and name in (None, "dirichlet"):
        return (1, -float(alpha), text)
    return (2, 0.0, text)


def _map_dimensions(rows: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """The map's dimensions: (name, readable name, row -> (shown value, sort key)); the partition keys make
    one dimension, then clients per round, local epochs, then the other varying keys, most values first."""
    keys = rows[0]["keys"]
    dims: list[tuple[str, str, Any]] = []
    if any(k.startswith("data.partition.") for k in keys):
        # a partition option other than the name and α is shown only where it differs between rows of the same
        # partition and α (min_size, set for Dirichlet and absent for IID, is not)
        seen: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for row in rows:
            values = row["values"]
            ident = (str(values.get("data.partition.name")), str(values.get("data.partition.alpha")))
            for k, v in values.items():
                seen[ident][k].add(format_value(v))
        varied = {k for options in seen.values() for k, shown in options.items() if len(shown) > 1}

        def partition(row: dict[str, Any]) -> tuple[str, tuple]:
            dirichlet = row["values"].get("data.partition.name") in (None, "dirichlet")
            values = {k: v for k, v in row["values"].items() if k.startswith("data.partition.")
                      and (k == "data.partition.name" or (k == "data.partition.alpha" and dirichlet) or k in varied)}
            text = _partition(values)
            return text, _partition_order(text, values)
        dims.append(("data.partition", "data partition (heterogeneity)", partition))

    def single(key: str) -> Any:
        return lambda row: (format_value(row["values"].get(key)), _sort_value(row["values"].get(key)))

    rest = [k for k in keys if not k.startswith("data.partition.")]
    ordered = [k for k in _MAP_AXES[1:] if k in rest]
    others = sorted((k for k in rest if k not in ordered),
                    key=lambda k: (-len({format_value(r["values"].get(k)) for r in rows}), k))
    dims += [(k, readable_name(k, keys), single(k)) for k in ordered + others]
    kept: list[tuple[str, str, Any]] = []
    for dim in dims:  # only what varies between the points and is not told by a dimension already kept
        shown = [dim[2](row)[0] for row in rows]
        if len(set(shown)) > 1 and not any(_function_of(shown, [k[2](row)[0] for row in rows]) for k in kept):
            kept.append(dim)
    return kept


def _function_of(values: list[str], other: list[str]) -> bool:
    """Whether ``values`` is determined by ``other`` (e.g. the server momentum by the algorithm)."""
    return len(set(zip(other, values, strict=True))) == len(set(other))


def _sort_value(value: Any) -> tuple:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, format_value(value))


@_literal_text
def plot_gain_map(rows: list[dict[str, Any]], path: Path, method: str = "gma") -> Path | None:
    """The map of GMA's gain: ``method`` − plain averaging in test-accuracy points (over the last 20% of
    rounds), a point with its 95% interval per setting, laid out by up to three of the settings' varying
    keys: x = the data partition (IID, then Dirichlet by decreasing α) or the first varying key, one line
    and marker per the second (clients per round), one panel per the third (local epochs). Settings that
    differ in any further varying key are shown only at its most common value (the others are in the
    gains table), named in the title. Filled markers: significant after Holm; open: not, or fewer than two
    seeds (no interval). Returns ``path``, or None when there is no such comparison."""
    rows = [r for r in rows if r["metric"] == "test_accuracy" and r["method"] == method and r["baseline"] == "mean"
            and r["difference"] is not None]
    if not rows:
        return None
    plt = _pyplot()
    dims = _map_dimensions(rows) if rows[0]["keys"] else []
    shown, fixed = dims[:3], dims[3:]
    fixed_text = []
    for _, name, get in fixed:  # a further key: keep its most common value
        counts: dict[str, int] = defaultdict(int)
        for row in rows:
            counts[get(row)[0]] += 1
        mode = max(counts, key=lambda v: (counts[v], v))
        rows = [r for r in rows if get(r)[0] == mode]
        fixed_text.append(f"{name} = {mode}")
    if fixed:  # the kept points: partition labels need only the options that still differ
        names = [d[0] for d in shown]
        shown = sorted((d for d in _map_dimensions(rows) if d[0] in names), key=lambda d: names.index(d[0]))
    taus = sorted({r["tau"] for r in rows if r["tau"] is not None})

    def coordinate(row: dict[str, Any], index: int) -> tuple[str, tuple]:
        return shown[index][2](row) if index < len(shown) else ("", ())

    xs = sorted({coordinate(r, 0) for r in rows}, key=lambda v: v[1])
    lines = sorted({(coordinate(r, 1), r["tau"] if len(taus) > 1 else None) for r in rows},
                   key=lambda v: (v[0][1], v[1] or 0))
    panels = sorted({coordinate(r, 2) for r in rows}, key=lambda v: v[1])
    x_index = {x[0]: i for i, x in enumerate(xs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.4, 0.9 * len(xs) + 3.2) * min(len(panels), 3) ** 0.8,
                                                      4.6), squeeze=False, sharey=True, layout="constrained")
    markers = "osD^vP*Xh<>"
    width = 0.5
    offsets = [0.0] if len(lines) == 1 else [width * (i / (len(lines) - 1) - 0.5) for i in range(len(lines))]
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, (line, tau) in enumerate(lines):
            points = sorted((r for r in rows if coordinate(r, 2) == panel and coordinate(r, 1) == line
                             and (tau is None or r["tau"] == tau)), key=lambda r: x_index[coordinate(r, 0)[0]])
            if not points:
                continue
            px = [x_index[coordinate(r, 0)[0]] + offsets[i] for r in points]
            py = [100 * r["difference"] for r in points]
            low = [0.0 if r["ci_low"] is None else 100 * (r["difference"] - r["ci_low"]) for r in points]
            high = [0.0 if r["ci_high"] is None else 100 * (r["ci_high"] - r["difference"]) for r in points]
            colour, marker = f"C{i % 10}", markers[i % len(markers)]
            ax.errorbar(px, py, yerr=[low, high], color=colour, marker=marker, markersize=7, capsize=4,
                        linestyle="-" if len(xs) > 1 else "none", linewidth=1, alpha=0.9, markerfacecolor="white")
            sig = [(x, y) for x, y, r in zip(px, py, points, strict=True) if r["significant"]]
            if sig:
                ax.plot(*zip(*sig, strict=True), linestyle="none", marker=marker, markersize=7, color=colour, zorder=3)
        ax.axhline(0, color="black", linewidth=1)
        ax.set_xticks(range(len(xs)), [_fill(x[0], 18) or "all settings" for x in xs])
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_xlabel(shown[0][1] if shown else "")
        if len(shown) > 2:
            ax.set_title(f"{shown[2][1]} = {panel[0]}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"{method} − mean, test accuracy\n(points, last {100 * rows[0]['fraction']:g}% of rounds)")
    handles, labels = [], []
    for i, (line, tau) in enumerate(lines):
        handles.append(plt.Line2D([], [], color=f"C{i % 10}", marker=markers[i % len(markers)], markersize=7,
                                  markerfacecolor="white"))
        parts = [f"{shown[1][1]} = {line[0]}"] if len(shown) > 1 else []
        parts += [f"τ = {number(tau)}"] if tau is not None else []
        labels.append(", ".join(parts) or method)
    handles += [plt.Line2D([], [], color="gray", marker="o", linestyle="none"),
                plt.Line2D([], [], color="gray", marker="o", linestyle="none", markerfacecolor="white")]
    labels += ["significant after Holm (0.05)", "not significant"]
    fig.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    seeds = _seed_range(rows)
    title = (f"{method} − plain averaging by setting: mean and 95% t-interval over {seeds} paired "
             f"seed{'' if seeds == '1' else 's'}"
             + ("\n" + _fill(f"(only {', '.join(fixed_text)})", 110) if fixed_text else ""))
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
