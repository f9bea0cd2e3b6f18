"""Pictures of a partition: a clients × classes heat-map of label counts and a histogram of client sizes.

Both read the statistics :func:`fedgma.data.federated.build_federated` records (the
``partition.json`` of a run folder: ``sizes``, ``label_counts``, ``dataset``, ``partition`` and,
under feature skew, ``domain_of_client``), so they can be redrawn from a finished run without the
data. :func:`write_partition_files` writes the JSON and both PNGs; the simulator calls it at the
start of every run and ``fedgma partition`` calls it for a config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "client_size_histogram",
    "partition_heatmap",
    "partition_summary",
    "partition_table",
    "write_partition_files",
]

HEATMAP = "partition_heatmap.png"
HISTOGRAM = "client_sizes.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _setting(statistics: dict[str, Any]) -> str:
    return f"{statistics.get('dataset', 'data')}, {statistics.get('partition', 'partition')}"


def partition_heatmap(statistics: dict[str, Any], path: str | Path) -> Path:
    """Save a heat-map of ``label_counts`` (rows: clients, columns: classes) with a colour bar to ``path``."""
    plt = _pyplot()
    counts = np.asarray(statistics["label_counts"], dtype=float)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"label_counts must be a non-empty [clients, classes] table, got shape {counts.shape}")
    clients, classes = counts.shape
    height = min(9.0, 2.5 + 0.12 * clients)
    width = min(14.0, 3.5 + 0.35 * classes)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    image = ax.imshow(counts, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax, label="records")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if classes <= 20:
        ax.set_xticks(range(classes))
    domains = statistics.get("domain_of_client")
    if clients <= 30:
        ax.set_yticks(range(clients))
        if domains and len(domains) == clients:
            ax.set_yticklabels([f"{i} ({d})" for i, d in enumerate(domains)], fontsize=7)
    entropy = statistics.get("mean_entropy")
    subtitle = f"; mean label entropy {entropy:.2f} nats" if entropy is not None else ""
    ax.set_title(f"Label counts per client ({_setting(statistics)}){subtitle}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def client_size_histogram(statistics: dict[str, Any], path: str | Path) -> Path:
    """Save a histogram of the clients' record counts (``sizes``) to ``path``."""
    plt = _pyplot()
    sizes = np.asarray(statistics["sizes"], dtype=float)
    if sizes.size == 0:
        raise ValueError("sizes is empty: no clients to plot")
    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    bins = min(50, max(5, int(np.sqrt(sizes.size)) * 2))
    ax.hist(sizes, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set_xlabel("client size (training records)")
    ax.set_ylabel("clients")
    cv = statistics.get("size_cv")
    detail = f"; CV {cv:.2f}" if cv is not None else ""
    ax.set_title(
        f"Client sizes ({_setting(statistics)})\n{sizes.size} clients, "
        f"min {sizes.min():.0f}, median {np.median(sizes):.0f}, max {sizes.max():.0f}{detail}",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_partition_files(out_dir: str | Path, statistics: dict[str, Any], plots: bool = True) -> list[Path]:
    """Write ``partition.json`` and (``plots``) the heat-map and size histogram PNGs into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "partition.json"]
    written[0].write_text(json.dumps(statistics))
    if plots and statistics.get("label_counts") and statistics.get("sizes"):
        written.append(partition_heatmap(statistics, out / HEATMAP))
        written.append(client_size_histogram(statistics, out / HISTOGRAM))
    return written


def _entropy(counts: np.ndarray) -> np.ndarray:
    sizes = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, sizes, out=np.zeros_like(counts, dtype=float), where=sizes > 0)
    return 0.0 - np.sum(np.where(share > 0, share * np.log(np.where(share > 0, share, 1.0)), 0.0), axis=1)  # no -0


def partition_table(statistics: dict[str, Any], max_rows: int = 10, title: str | None = None):
    """A compact :class:`rich.table.Table` of per-client sizes, label counts and label entropy.

    With more than ``max_rows`` clients it shows the first and last ``max_rows // 2`` clients and
    summary rows (total per class; min, median, mean, max of sizes and entropies). With more than
    20 classes the per-class columns give way to "classes held" and the largest class's share.
    """
    from rich import box
    from rich.table import Table

    counts = np.asarray(statistics["label_counts"], dtype=np.int64)
    sizes = counts.sum(axis=1)
    entropy = _entropy(counts)
    clients, classes = counts.shape
    domains = statistics.get("domain_of_client")
    ids = statistics.get("client_ids")
    wide = classes <= 20
    table = Table(
        title=title or f"{_setting(statistics)}: {clients} clients, {classes} classes",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("client", justify="right")
    if ids is not None:
        table.add_column("id")
    if domains is not None:
        table.add_column("domain")
    table.add_column("size", justify="right")
    if wide:
        for c in range(classes):
            table.add_column(str(c), justify="right")
    else:
        table.add_column("classes held", justify="right")
        table.add_column("top class share", justify="right")
    table.add_column("entropy", justify="right")

    def client_row(i: int) -> list[str]:
        cells = [str(i)]
        cells += [str(ids[i])] if ids is not None else []
        cells += [str(domains[i])] if domains is not None else []
        cells.append(str(sizes[i]))
        if wide:
            cells += [str(v) if v else "·" for v in counts[i]]
        else:
            cells += [str(int((counts[i] > 0).sum())), f"{counts[i].max() / max(sizes[i], 1):.2f}"]
        return [*cells, f"{entropy[i]:.2f}"]

    def summary_row(label: str, size: str, per_class: list[str], ent: str) -> list[str]:
        lead = [label] + [""] * ((ids is not None) + (domains is not None))
        middle = per_class if wide else ["", ""]
        return [*lead, size, *middle, ent]

    if clients <= max_rows:
        for i in range(clients):
            table.add_row(*client_row(i))
    else:
        head = max(1, max_rows // 2)
        for i in range(head):
            table.add_row(*client_row(i))
        table.add_row(*["⋮"] * len(table.columns), style="dim")
        for i in range(clients - head, clients):
            table.add_row(*client_row(i))
    table.add_section()
    table.add_row(*summary_row("total", str(int(sizes.sum())), [str(int(v)) for v in counts.sum(axis=0)], ""))
    for label, fn in (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max)):
        table.add_row(*summary_row(label, f"{fn(sizes):.0f}", [""] * classes, f"{fn(entropy):.2f}"), style="bold")
    return table


def partition_summary(statistics: dict[str, Any]) -> str:
    """One paragraph: label entropy against the IID value, size spread, test sets, held-out clients."""
    counts = np.asarray(statistics["label_counts"])
    classes = counts.shape[1]
    lines = [
        f"mean label entropy {statistics.get('mean_entropy', float(_entropy(counts).mean())):.3f} nats "
        f"(IID: ≤ log {classes} = {np.log(classes):.3f}); client size CV {statistics.get('size_cv', 0.0):.3f}",
        f"test records: {statistics.get('test_size', '?')} (in-distribution)",
    ]
    for name, size in statistics.get("extra_test_sizes", {}).items():
        lines.append(f"extra test set {name}: {size} records")
    holdout = statistics.get("holdout")
    if holdout:
        lines.append(f"held-out clients (test only): {holdout['clients']}, sizes {holdout['sizes']}")
    return "\n".join(lines)
