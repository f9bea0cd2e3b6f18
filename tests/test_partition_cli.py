"""fedgma partition CONFIG: the per-client table, partition.json and the two PNGs."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fedgma.cli import main
from fedgma.plots import partition_table, write_partition_files

CONFIG = """
name = "digits-shards"
[data]
dataset = "digits"
partition = "shards"
classes_per_client = 2
num_clients = {clients}
[data.domains]
kind = "rotation"
train = [0, 90]
test = [45]
[server]
clients_per_round = 2
"""


def write_config(tmp_path, clients: int):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG.format(clients=clients))
    return path


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_partition_prints_the_table_and_writes_pngs(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["partition", str(write_config(tmp_path, 6)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "digits-shards: digits, shards, 6 clients" in lines[0]
    header = next(line for line in lines if "client" in line and "size" in line)
    assert header.split() == ["client", "domain", "size", *map(str, range(10)), "entropy"]
    rows = [line.split() for line in lines if line.split() and line.split()[0] in map(str, range(6))]
    assert [r[0] for r in rows] == [str(i) for i in range(6)] and rows[0][1] == "rot0" and rows[5][1] == "rot90"
    stats = json.loads((out / "partition.json").read_text())
    assert [int(r[2]) for r in rows] == stats["sizes"]
    assert all(sum(v != "·" for v in r[3:13]) == 2 for r in rows)  # shards: two classes each
    total = next(line.split() for line in lines if line.split()[:1] == ["total"])
    assert int(total[1]) == sum(stats["sizes"])
    assert "extra test set ood/rot45" in result.output
    for name in ("partition_heatmap.png", "client_sizes.png"):
        assert is_png(out / name)
    assert {"sizes", "label_counts", "mean_entropy", "size_cv", "domain_of_client"} <= set(stats)


def test_many_clients_show_first_last_and_summary_rows(tmp_path):
    result = CliRunner().invoke(main, ["partition", str(write_config(tmp_path, 40)), "--out", str(tmp_path / "o"),
                                       "--rows", "6"])
    assert result.exit_code == 0, result.output
    first = [line.split()[0] for line in result.output.splitlines() if line.split()]
    shown = [c for c in first if c.isdigit()]
    assert shown == ["0", "1", "2", "37", "38", "39"]
    assert {"⋮", "total", "min", "median", "mean", "max"} <= set(first)
    assert "(first and last 3 shown)" in result.output


def test_partition_errors_are_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[data]\ndataset = "digits"\npartition = "natural"\nnum_clients = 4\n'
                    '[server]\nclients_per_round = 2\n')
    result = CliRunner().invoke(main, ["partition", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "'natural' needs a dataset with client ids" in result.output
    result = CliRunner().invoke(main, ["partition", str(path), "--set", "data.dataset.nope=1"])
    assert result.exit_code == 2 and "has no option 'nope'" in result.output


def test_many_classes_use_summary_columns(tmp_path):
    stats = {"sizes": [5, 3], "label_counts": [[1] * 5 + [0] * 25, [0] * 27 + [1, 1, 1]], "dataset": "x"}
    table = partition_table(stats)
    assert [c.header for c in table.columns] == ["client", "size", "classes held", "top class share", "entropy"]
    written = write_partition_files(tmp_path, stats)
    assert [p.name for p in written] == ["partition.json", "partition_heatmap.png", "client_sizes.png"]
    with pytest.raises(ValueError, match="label_counts"):
        from fedgma.plots import partition_heatmap

        partition_heatmap({"label_counts": []}, tmp_path / "x.png")
