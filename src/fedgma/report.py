"""Reports from run folders: read every run, group seeds, and tabulate mean ± std."""

from __future__ import annotations

import functools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedgma.config import flatten

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
    """A finished run: where it is, its config, its evaluations and its summary.

    ``setting`` is the folder the run sits in, relative to the folder a report was asked for
    (e.g. ``dir0.1`` for ``runs/paper/dir0.1/<run>``), so that runs of different settings with the
    same folder name are never mixed.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]
    setting: str = ""

    @property
    def label(self) -> str:
        """The run's identity without its seed: setting / folder name minus ``seedN``."""
        name = self.path.name
        head, _, tail = name.rpartition("seed")
        base = head.rstrip("_") if tail.isdigit() and head else name
        return f"{self.setting}/{base}" if self.setting else base

    def rounds(self) -> list[dict[str, Any]]:
        """The per-round records (``rounds.jsonl``: train loss, GMA mask statistics), read on demand."""
        path = self.path / "rounds.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(path: str | Path, setting: str = "") -> RunRecord:
    import tomllib

    path = Path(path)
    metrics = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return RunRecord(
        path,
        tomllib.loads((path / "config.toml").read_text()),
        metrics,
        json.loads((path / "summary.json").read_text()),
        setting,
    )


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every finished run folder (one holding ``summary.json``) under ``root``, in name order."""
    root = Path(root)
    runs = []
    for marker in sorted(root.rglob("summary.json")):
        parent = marker.parent.parent
        setting = "" if marker.parent == root or parent == root else parent.relative_to(root).as_posix()
        runs.append(load_run(marker.parent, setting))
    return runs


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


# --------------------------------------------------------------------------------------------
# The experiment table: one row per setting × configuration, seeds pooled
# --------------------------------------------------------------------------------------------

#: Config keys that do not define *what* is compared: the seed, the name, and the aggregation knobs
#: (GMA is paired with plain averaging of the same setting and algorithm whatever its τ or lr).
_PAIRING_IGNORES = {"seed", "name", "server.aggregator", "server.threshold", "server.hard",
                    "server.weighted_agreement", "server.lr"}

def t_quantile(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom (for a 95% interval)."""
    if dof < 1:
        return float("nan")
    from scipy.stats import t  # scipy comes with scikit-learn

    return float(t.ppf(0.975, dof))


@functools.cache
def _defaults() -> dict[str, Any]:
    from fedgma.config import Config, config_to_dict

    return flatten(config_to_dict(Config()))


def rounds_to_target(metrics: list[dict[str, Any]], target: float, key: str = "test_accuracy") -> int | None:
    """The first evaluated round whose ``key`` is ≥ ``target`` (None if never)."""
    for record in metrics:
        if key in record and record[key] >= target:
            return int(record["round"])
    return None


@dataclass
class Group:
    """Runs of one setting and configuration that differ only in their seed."""

    setting: str
    label: str
    runs: list[RunRecord]
    selected: bool = True  # False: another server lr won on validation

    @property
    def flat(self) -> dict[str, Any]:
        """The run's config, flattened, over today's defaults: a key a run folder lacks (written before
        the key existed) takes its default, which is what that run did."""
        return {**_defaults(), **flatten(self.runs[0].config)}

    @property
    def algorithm(self) -> str:
        return str(self.runs[0].summary["algorithm"])

    @property
    def aggregator(self) -> str:
        return str(self.runs[0].summary["aggregator"])

    @property
    def threshold(self) -> float | None:
        return float(self.flat["server.threshold"]) if self.aggregator == "gma" else None

    @property
    def server_lr(self) -> float:
        return float(self.flat["server.lr"])

    @property
    def seeds(self) -> list[int]:
        return [int(r.summary["seed"]) for r in self.runs]

    def final(self, key: str = "test_accuracy") -> list[float]:
        return [float(r.summary["final"][key]) for r in self.runs if key in r.summary["final"]]

    def best(self) -> list[float]:
        return [float(r.summary["best"]["test_accuracy"]) for r in self.runs]

    def by_seed(self, key: str = "test_accuracy") -> dict[int, float]:
        return {int(r.summary["seed"]): float(r.summary["final"][key]) for r in self.runs if key in r.summary["final"]}

    def pair_key(self) -> tuple[str, str]:
        """What GMA is paired on: the setting and every config value but seed and aggregation knobs."""
        rest = {k: v for k, v in self.flat.items() if k not in _PAIRING_IGNORES}
        return self.setting, json.dumps(rest, sort_keys=True, default=str)

    def lr_key(self) -> tuple[str, str]:
        """Configurations that differ only in the server lr (and seed) share this key."""
        rest = {k: v for k, v in self.flat.items() if k not in {"seed", "name", "server.lr"}}
        return self.setting, json.dumps(rest, sort_keys=True, default=str)


def make_groups(runs: Iterable[RunRecord], metric: str = "validation_accuracy") -> list[Group]:
    """Group runs by setting and label; where only the server lr differs, mark the lr with the best mean
    final ``metric`` (the validation split, never the test set) as selected and the others not."""
    groups = [Group(g[0].setting, label, sorted(g, key=lambda r: r.summary["seed"]))
              for label, g in group_runs(runs).items()]
    by_lr: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        by_lr[group.lr_key()].append(group)
    for family in by_lr.values():
        if len(family) < 2:
            continue
        if not all(group.final(metric) for group in family):
            continue  # no validation split: keep every lr (GMA is then paired at equal lr)
        best = max(family, key=lambda g: (statistics.fmean(g.final(metric)), -g.server_lr))
        for group in family:
            group.selected = group is best
    return groups


def _extra_accuracies(groups: Iterable[Group], per_domain: bool = True) -> list[str]:
    """Accuracy keys besides test (validation, ood, ...), in a stable order; ``per_domain=False`` leaves
    out the per-domain ones (``ood/<domain>_accuracy``), whose mean is ``ood_accuracy``."""
    keys = {k for g in groups for r in g.runs for k in r.summary["final"] if k.endswith("_accuracy")}
    keys.discard("test_accuracy")
    if not per_domain:
        keys = {k for k in keys if "/" not in k}
    return sorted(keys, key=lambda k: (k != "validation_accuracy", k))


def pair_groups(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(plain averaging, GMA) pairs: same setting and configuration except the aggregation knobs.

    Only selected groups take part; if several plain-averaging groups match (no validation to choose
    a server lr), GMA is paired with the one at its own server lr.
    """
    means: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.selected and group.aggregator == "mean":
            means[group.pair_key()].append(group)
    pairs = []
    for group in groups:
        if not group.selected or group.aggregator != "gma":
            continue
        candidates = means.get(group.pair_key(), [])
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.server_lr == group.server_lr]
        if len(candidates) == 1:
            pairs.append((candidates[0], group))
    return pairs


def table_rows(
    groups: list[Group], target_fraction: float = 0.95, target: float | None = None
) -> list[dict[str, Any]]:
    """One row per group: final/best test accuracy and other accuracies (mean, std over seeds), and the
    rounds each needs to reach a target accuracy.

    The target is ``target`` if given; otherwise, for a pair (plain averaging, GMA), ``target_fraction``
    × the mean final test accuracy of plain averaging, the same target for both rows of the pair.
    """
    extras = _extra_accuracies(groups)
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
        extra = _extra_accuracies([base, gma_group], per_domain=False)
        keys = ["test_accuracy", *[k for k in extra if k != "validation_accuracy"]]
        for key in keys:
            a, b = base.by_seed(key), gma_group.by_seed(key)
            seeds = sorted(set(a) & set(b))
            diffs = [b[s] - a[s] for s in seeds]
            row[f"gain_{key}"] = _gain_stats(diffs)
        best_a = {int(r.summary["seed"]): float(r.summary["best"]["test_accuracy"]) for r in base.runs}
        best_b = {int(r.summary["seed"]): float(r.summary["best"]["test_accuracy"]) for r in gma_group.runs}
        seeds = sorted(set(best_a) & set(best_b))
        row["gain_best_test_accuracy"] = _gain_stats([best_b[s] - best_a[s] for s in seeds])
        row["seeds"] = len(seeds)
        row["verdict"] = row["gain_test_accuracy"]["verdict"]
        rows.append(row)
    rows.sort(key=lambda r: (r["setting"], r["algorithm"], r["threshold"] or 0))
    return rows


def _gain_stats(diffs: list[float]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------
# Writing: Markdown and CSV tables
# --------------------------------------------------------------------------------------------


def _pct(value: tuple[float, float] | None) -> str:
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


def _number(value: float | None, digits: int = 4) -> str:
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
        lr = _number(r["server_lr"]) + ("" if r["selected"] else " (not selected)")
        rounds = ""
        if r["target"] is not None:
            reached = "—" if r["rounds_to_target"] is None else f"{r['rounds_to_target']:.0f}"
            rounds = f"{reached} ({r['reached']})"
        body.append([r["setting"] or ".", r["algorithm"], r["aggregator"], _number(r["threshold"]), lr,
                     str(r["seeds"]), _pct(r["final_test_accuracy"]), _pct(r["best_test_accuracy"]),
                     *[_pct(r.get(k)) for k in extras], "" if r["target"] is None else f"{100 * r['target']:.2f}",
                     rounds, f"{r['wall_s']:.0f}"])
    return _markdown(header, body)


def gains_markdown(rows: list[dict[str, Any]]) -> str:
    """GMA − mean in accuracy points: mean ± std over seeds [95% interval], and the verdict."""
    extras = sorted({k for r in rows for k in r if k.startswith("gain_") and k not in
                     {"gain_test_accuracy", "gain_best_test_accuracy"}})
    header = ["setting", "algorithm", "τ", "server lr (mean / gma)", "seeds", "Δ final test (pts)",
              "Δ best test (pts)", *[f"Δ {k.removeprefix('gain_').replace('_accuracy', '')} (pts)" for k in extras],
              "verdict (final test)"]
    body = [[r["setting"] or ".", r["algorithm"], _number(r["threshold"]),
             f"{_number(r['lr_mean'])} / {_number(r['lr_gma'])}", str(r["seeds"]),
             _gain_text(r["gain_test_accuracy"]), _gain_text(r["gain_best_test_accuracy"]),
             *[_gain_text(r[k]) if k in r else "" for k in extras], r["verdict"]] for r in rows]
    return _markdown(header, body)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import csv

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


# --------------------------------------------------------------------------------------------
# Plots (matplotlib, headless)
# --------------------------------------------------------------------------------------------


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


def _name(group: Group) -> str:
    if group.aggregator == "gma":
        return f"{group.algorithm}+GMA (τ={group.threshold:g}, server lr {group.server_lr:g})"
    return f"{group.algorithm} (mean, server lr {group.server_lr:g})"


def plot_curves(pairs: list[tuple[Group, Group]], path: Path, title: str) -> Path:
    """Test (and out-of-distribution) accuracy versus round, mean ± std band over seeds, per algorithm."""
    plt = _pyplot()
    algorithms = sorted({gma_group.algorithm for _, gma_group in pairs})
    extra = [k for k in _extra_accuracies([g for pair in pairs for g in pair], per_domain=False)
             if k != "validation_accuracy"]
    keys = ["test_accuracy", *extra]
    fig, axes = plt.subplots(len(keys), len(algorithms), figsize=(4.2 * len(algorithms), 3.4 * len(keys)),
                             squeeze=False, sharex=True)
    for col, algorithm in enumerate(algorithms):
        chosen = [pair for pair in pairs if pair[1].algorithm == algorithm]
        base = chosen[0][0]
        for row, key in enumerate(keys):
            ax = axes[row][col]
            _band(ax, base.runs, key, _name(base), scale=100, color="tab:blue")
            for _, gma_group in chosen:
                _band(ax, gma_group.runs, key, _name(gma_group), scale=100, color="tab:orange")
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
            ax_density.set_title(f"{_name(group)}: mask density", fontsize=9)
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


def tau_families(groups: list[Group]) -> list[list[Group]]:
    """Sets of selected GMA groups that differ only in τ (three values or more): τ sweeps."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.aggregator == "gma" and group.selected:
            families[group.pair_key()].append(group)
    return [sorted(f, key=lambda g: g.threshold or 0) for f in families.values()
            if len({g.threshold for g in f}) >= 3]


def plot_tau(family: list[Group], base: Group | None, path: Path, title: str) -> Path:
    """Final and best test accuracy versus GMA's threshold τ (mean ± std over seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    taus = [g.threshold for g in family]
    keys = [("final", lambda g: g.final()), ("best", lambda g: g.best())]
    extra = [k for k in _extra_accuracies(family, per_domain=False) if k != "validation_accuracy"]
    keys += [(f"final {k.replace('_accuracy', '')}", lambda g, k=k: g.final(k)) for k in extra]
    for label, values in keys:
        stats = [mean_std(values(g)) for g in family]
        ax.errorbar(taus, [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o", capsize=3,
                    label=f"{label} test accuracy" if "test" not in label and label in ("final", "best") else label)
    if base is not None:
        mean, std = mean_std(base.final())
        ax.axhline(100 * mean, color="gray", linestyle="--", label=f"plain averaging, final ({_number(100 * mean)}%)")
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


# --------------------------------------------------------------------------------------------
# The whole report
# --------------------------------------------------------------------------------------------


def write_report(
    root: str | Path, out: str | Path | None = None, target_fraction: float = 0.95, target: float | None = None
) -> dict[str, Any]:
    """Read every run under ``root`` and write tables (Markdown, CSV), plots and ``report.md`` to ``out``.

    Returns the rows and the paths written. Raises ``ValueError`` when ``root`` holds no finished run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist")
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"no finished runs (folders with summary.json) under {root}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    out = Path(out) if out is not None else root / "report"
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    groups = make_groups(runs)
    rows = table_rows(groups, target_fraction, target)
    gains = gain_rows(groups)
    diverged = find_diverged(root)

    (out / "summary.md").write_text(table_markdown(rows))
    _write_csv(out / "summary.csv", rows)
    (out / "gains.md").write_text(gains_markdown(gains))
    _write_csv(out / "gains.csv", gains)

    selection = _selection(groups)
    (out / "server_lr_selection.json").write_text(json.dumps(selection, indent=2, ensure_ascii=False))

    figures: list[Path] = []
    pairs = pair_groups(groups)
    for setting in sorted({g.setting for g in groups}):
        slug = (setting or "runs").replace("/", "_")
        in_setting = [p for p in pairs if p[1].setting == setting]
        if in_setting:
            figures.append(plot_curves(in_setting, plots / f"curves_{slug}.png", setting or str(root)))
        mask = plot_mask([g for g in groups if g.setting == setting and g.selected],
                         plots / f"mask_{slug}.png", setting or str(root))
        if mask:
            figures.append(mask)
    for family in tau_families(groups):
        slug = (family[0].setting or "runs").replace("/", "_")
        base = next((m for m, g in pairs if g in family), None)
        figures.append(plot_tau(family, base, plots / f"tau_{slug}_{family[0].algorithm}.png",
                                family[0].setting or str(root)))
    gain_plot = plot_gains(gains, plots / "gains.png")
    if gain_plot:
        figures.append(gain_plot)

    lines = [f"# Report: {root}", "", f"{len(runs)} finished runs, {len(diverged)} diverged, "
             f"{len(groups)} configurations.", ""]
    if gains:
        lines += ["## GMA − plain averaging (accuracy points, paired by seed)", "",
                  "mean ± std over seeds [95% t-interval]; *verdict*: whether the interval excludes 0.", "",
                  gains_markdown(gains)]
    lines += ["## All configurations", "",
              f"Accuracy in %, mean ± std over seeds. Target: {target_fraction:g} × plain averaging's final test "
              "accuracy of the same setting and algorithm (first evaluated round reaching it; seeds reaching it)."
              if target is None else f"Accuracy in %, mean ± std over seeds. Target: {100 * target:.2f}%.", "",
              table_markdown(rows)]
    if selection:
        shown = json.dumps(selection, indent=1, ensure_ascii=False)
        lines += ["## Server lr selected on validation accuracy", "", "```json", shown, "```", ""]
    if diverged:
        lines += ["## Diverged runs", ""] + [f"- {d['path'].relative_to(root)}: {d['error']}" for d in diverged] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows, "gains": gains, "out": out, "figures": figures, "diverged": diverged}


def _selection(groups: list[Group]) -> dict[str, Any]:
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
