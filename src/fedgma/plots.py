"""Pictures of a partition: a clients × classes heat-map of class fractions and a histogram of client sizes.

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
    "CLASS_NAMES",
    "class_fractions",
    "class_names",
    "client_order",
    "client_size_histogram",
    "partition_heatmap",
    "partition_summary",
    "partition_table",
    "partition_title",
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


#: Class names of the built-in datasets (index order); other datasets show class indices, or the
#: ``class_names`` a partition's statistics carry.
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


def class_names(statistics: dict[str, Any], classes: int) -> list[str]:
    """Names of the ``classes`` columns: ``statistics["class_names"]``, the dataset's own, or the indices."""
    names = statistics.get("class_names") or CLASS_NAMES.get(str(statistics.get("dataset", "")).lower())
    return [str(n) for n in names] if names and len(names) == classes else [str(c) for c in range(classes)]


def partition_title(statistics: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    """``"fashion-mnist, dirichlet(alpha=0.1, min_size=10)"``: the dataset and the partition with its options
    (``options``, else ``statistics["partition_options"]``)."""
    options = options if options is not None else statistics.get("partition_options") or {}
    shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items()
                      if v is not None)
    partition = f"{statistics.get('partition', 'partition')}" + (f"({shown})" if shown else "")
    return f"{statistics.get('dataset', 'data')}, {partition}"


def _options_from_run(out_dir: Path) -> dict[str, Any] | None:
    """The partition options of the run folder ``out_dir`` (its config.toml), if it has one."""
    config = out_dir / "config.toml"
    if not config.is_file():
        return None
    try:
        import tomllib

        from fedgma.report.runs import read_config

        table = read_config(tomllib.loads(config.read_text()), out_dir).get("data", {}).get("partition", {})
    except Exception:  # a title detail: never fail a run over it
        return None
    return {k: v for k, v in table.items() if k != "name"} if isinstance(table, dict) else None


def client_order(counts: np.ndarray, domains: list[Any] | None = None) -> np.ndarray:
    """Clients sorted for display: by domain (if any), then by their largest class, then by that class's
    share (largest first), so clients of similar label mixes sit together. Returns indices [clients]."""
    sizes = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, sizes, out=np.zeros_like(counts, dtype=float), where=sizes > 0)
    top = share.argmax(axis=1)
    keys: list[Any] = [-share.max(axis=1), top]
    if domains is not None:
        first_seen = {d: i for i, d in reversed(list(enumerate(str(d) for d in domains)))}
        keys.append(np.asarray([first_seen[str(d)] for d in domains]))  # domains in order of first client
    return np.lexsort(keys)


def class_fractions(statistics: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(fractions [clients, classes] float64, order [clients])``: each client's share of its records per
    class (rows sum to 1; an empty client is all 0), rows already in display order (:func:`client_order`).

    Raises:
        ValueError: ``label_counts`` is not a non-empty [clients, classes] table.
    """
    counts = np.asarray(statistics["label_counts"], dtype=float)
    if counts.ndim != 2 or counts.size == 0:
        raise ValueError(f"label_counts must be a non-empty [clients, classes] table, got shape {counts.shape}")
    domains = statistics.get("domain_of_client")
    order = client_order(counts, domains if domains and len(domains) == len(counts) else None)
    sizes = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sizes, out=np.zeros_like(counts), where=sizes > 0)[order], order


def partition_heatmap(statistics: dict[str, Any], path: str | Path, options: dict[str, Any] | None = None) -> Path:
    """Save a heat-map of each client's class fractions to ``path`` (PNG).

    Rows are clients (sorted by :func:`client_order`; a strip on the left marks each client's domain
    under feature skew), columns are classes (named, :func:`class_names`), and a cell is the fraction of
    that client's records in that class, so every row sums to 1 and the colour scale is fixed to [0, 1]
    (an IID split looks uniform whatever the client sizes). The title names the dataset and the
    partition with its ``options``. Readable up to thousands of clients (row labels only up to 40).

    Raises:
        ValueError: ``label_counts`` is not a non-empty [clients, classes] table.
    """
    share, order = class_fractions(statistics)
    plt = _pyplot()
    clients, classes = share.shape
    domains = statistics.get("domain_of_client")
    domains = domains if domains and len(domains) == clients else None
    names = class_names(statistics, classes)
    longest = max(len(n) for n in names)
    height = min(10.0, 2.6 + (0.22 * clients if clients <= 40 else 6.0))
    width = min(16.0, 4.0 + 0.45 * classes + (1.0 if domains else 0.0))
    fig = plt.figure(figsize=(width, height + 0.06 * longest), layout="constrained")
    if domains:
        strip_ax, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3 * classes]}, sharey=True)
    else:
        ax, strip_ax = fig.subplots(), None
    image = ax.imshow(share, aspect="auto", interpolation="nearest" if clients <= 400 else "antialiased",
                      cmap="viridis", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of the client's records", fraction=0.05, pad=0.02)
    ax.set_xticks(range(classes), names, rotation=45 if longest > 3 else 0, ha="right" if longest > 3 else "center",
                  fontsize=8 if classes <= 20 else 6)
    if classes > 40:
        ax.set_xticks(range(0, classes, max(1, classes // 20)))
    ax.set_xlabel("class")
    label = "client (sorted by " + ("domain, then " if domains else "") + "largest class)"
    target = strip_ax if strip_ax is not None else ax
    if clients <= 40:
        target.set_yticks(range(clients), [str(i) for i in order], fontsize=7)
    target.set_ylabel(label + ("" if clients <= 40 else f"; {clients} clients"))
    if strip_ax is not None:
        values = [str(d) for d in domains]
        kinds = list(dict.fromkeys(values[i] for i in order))
        index = np.array([kinds.index(values[i]) for i in order])[:, None]
        strip_ax.imshow(index, aspect="auto", interpolation="nearest", cmap="tab20", vmin=0, vmax=19)
        strip_ax.set_xticks([0], ["domain"], fontsize=8)
        for k, kind in enumerate(kinds):
            rows = np.flatnonzero(index[:, 0] == k)
            strip_ax.text(0, rows.mean(), kind, rotation=90, ha="center", va="center", fontsize=7, color="black",
                          clip_on=True)
    entropy = statistics.get("mean_entropy")
    detail = f"; mean label entropy {entropy:.2f} nats (IID: {np.log(classes):.2f})" if entropy is not None else ""
    kinds = list(dict.fromkeys(str(d) for d in domains)) if domains else []
    shown = ", ".join(kinds[:6]) + (", ..." if len(kinds) > 6 else "")
    domain_text = f", {len(kinds)} domains ({shown})" if kinds else ""
    fig.suptitle(f"Class fractions per client: {partition_title(statistics, options)}\n"
                 f"{clients} clients, {classes} classes{domain_text}{detail}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def client_size_histogram(statistics: dict[str, Any], path: str | Path, options: dict[str, Any] | None = None
                          ) -> Path:
    """Save a histogram of the clients' training-record counts (``sizes``) to ``path`` (PNG).

    Bins are whole numbers of records; equal sizes give one bar centred on that size with a readable axis
    (not 599.6-600.4). Raises ``ValueError`` when ``sizes`` is empty.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    sizes = np.asarray(statistics["sizes"], dtype=float)
    if sizes.size == 0:
        raise ValueError("sizes is empty: no clients to plot")
    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    low, high = float(sizes.min()), float(sizes.max())
    if high - low < 1:
        width = max(1.0, 0.05 * high)
        ax.bar([low], [sizes.size], width=width, color="#4c72b0", edgecolor="white")
        ax.set_xlim(low - 10 * width, low + 10 * width)
        spread = f"all {sizes.size} clients hold {low:.0f} records"
    else:
        bins = min(50, max(5, int(np.sqrt(sizes.size)) * 2), int(high - low) + 1)
        edges = np.unique(np.round(np.linspace(low, high + 1, bins + 1)))
        ax.hist(sizes, bins=edges, color="#4c72b0", edgecolor="white")
        cv = statistics.get("size_cv")
        spread = (f"{sizes.size} clients: min {low:.0f}, median {np.median(sizes):.0f}, max {high:.0f}"
                  + (f", CV {cv:.2f}" if cv is not None else ""))
    ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("client size (training records)")
    ax.set_ylabel("clients")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"Client sizes: {partition_title(statistics, options)}\n{spread}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_partition_files(out_dir: str | Path, statistics: dict[str, Any], plots: bool = True,
                          options: dict[str, Any] | None = None) -> list[Path]:
    """Write ``partition.json`` and (``plots``) the heat-map and size histogram PNGs into ``out_dir``.

    ``options`` are the partition's options for the titles; by default they are read from
    ``out_dir/config.toml`` when ``out_dir`` is a run folder. Returns the paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "partition.json"]
    written[0].write_text(json.dumps(statistics))
    if plots and statistics.get("label_counts") and statistics.get("sizes"):
        options = options if options is not None else _options_from_run(out)
        written.append(partition_heatmap(statistics, out / HEATMAP, options))
        written.append(client_size_histogram(statistics, out / HISTOGRAM, options))
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
