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

__all__ = ["client_size_histogram", "partition_heatmap", "write_partition_files"]

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
    height = min(12.0, 2.5 + 0.12 * clients)
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
        f"Client sizes ({_setting(statistics)}): {sizes.size} clients, "
        f"min {sizes.min():.0f}, median {np.median(sizes):.0f}, max {sizes.max():.0f}{detail}",
        fontsize=9,
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
