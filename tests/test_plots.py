"""Partition pictures: class fractions (rows sum to 1, fixed [0, 1] scale), client order, class names, the
partition and its options in the title, and readable axes for equal client sizes and 1,000 clients."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from fedgma.plots import (
    class_fractions,
    class_names,
    client_order,
    client_size_histogram,
    partition_heatmap,
    partition_title,
    write_partition_files,
)


def _dirichlet(clients: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    counts = np.array([rng.multinomial(int(rng.integers(20, 2000)), rng.dirichlet([0.1] * 10))
                       for _ in range(clients)])
    return {"dataset": "fashion-mnist", "partition": "dirichlet", "label_counts": counts.tolist(),
            "sizes": counts.sum(axis=1).tolist()}


def test_class_fractions_rows_sum_to_one_in_display_order() -> None:
    counts = [[2, 0, 2], [0, 9, 1], [0, 0, 0], [5, 0, 0]]
    share, order = class_fractions({"label_counts": counts})
    # sorted by largest class (0: clients 3 then 0, 1: client 1), then by its share; empty client last in class 0
    assert order.tolist() == [3, 0, 2, 1]
    np.testing.assert_allclose(share[order.tolist().index(0)], [0.5, 0.0, 0.5])
    np.testing.assert_allclose(share.sum(axis=1), [1, 1, 0, 1])  # the empty client is all 0
    by_domain = client_order(np.array(counts, dtype=float), ["b", "a", "b", "a"])
    assert by_domain.tolist() == [0, 2, 3, 1]  # domain b first (first seen), then a
    with pytest.raises(ValueError, match="non-empty"):
        class_fractions({"label_counts": []})


def test_class_names_and_title() -> None:
    assert class_names({"dataset": "fashion-mnist"}, 10)[9] == "Ankle boot"
    assert class_names({"dataset": "digits"}, 10) == [str(i) for i in range(10)]
    assert class_names({"class_names": ["cat", "dog"]}, 2) == ["cat", "dog"]
    statistics = {"dataset": "fashion-mnist", "partition": "dirichlet"}
    assert partition_title(statistics, {"alpha": 0.1, "min_size": 10}) == \
        "fashion-mnist, dirichlet(alpha=0.1, min_size=10)"
    assert partition_title({**statistics, "partition": "iid"}, {}) == "fashion-mnist, iid"


def test_heatmap_of_1000_clients_is_bounded_and_histogram_of_equal_sizes_renders(tmp_path: Path) -> None:
    path = partition_heatmap(_dirichlet(1000), tmp_path / "h.png", {"alpha": 0.1})
    height, width = matplotlib.image.imread(path).shape[:2]
    assert 500 <= height <= 1200 and 500 <= width <= 1800  # neither 1,000 rows of labels nor a sliver
    statistics = {"dataset": "fashion-mnist", "partition": "iid", "sizes": [600] * 20,
                  "label_counts": [[60] * 10] * 20, "domain_of_client": ["rot0"] * 10 + ["rot90"] * 10}
    import matplotlib.pyplot as plt

    client_size_histogram(statistics, tmp_path / "s.png")
    figures_before = plt.get_fignums()
    assert figures_before == []  # closed after saving
    # the equal-size axis: one bar at 600, limits well around it (not 599.6-600.4)
    from unittest import mock

    with mock.patch.object(plt, "close"):
        client_size_histogram(statistics, tmp_path / "s2.png")
        ax = plt.gcf().axes[0]
        low, high = ax.get_xlim()
        assert low < 600 < high and high - low >= 100
        assert "all 20 clients hold 600 records" in ax.get_title()
    plt.close("all")  # close is patched inside the block
    assert partition_heatmap(statistics, tmp_path / "d.png").is_file()


def test_write_partition_files_reads_the_options_from_the_run_folder(tmp_path: Path) -> None:
    from unittest import mock

    import matplotlib.pyplot as plt

    plt.close("all")
    (tmp_path / "config.toml").write_text('[data.partition]\nname = "dirichlet"\nalpha = 0.3\n')
    with mock.patch.object(plt, "close"):
        written = write_partition_files(tmp_path, _dirichlet(12))
        titles = [fig.get_suptitle() or fig.axes[0].get_title() for fig in map(plt.figure, plt.get_fignums())]
    plt.close("all")  # close is patched inside the block
    assert [p.name for p in written] == ["partition.json", "partition_heatmap.png", "client_sizes.png"]
    assert len(titles) == 2 and all("dirichlet(alpha=0.3)" in t for t in titles), titles
