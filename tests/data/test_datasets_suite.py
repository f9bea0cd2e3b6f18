"""One suite for every registered dataset loader, on small files the test writes (or built-in data).

Parametrised over ``DATASETS.names()``: every registered loader must have a tiny generator in
``GENERATORS`` (the suite fails naming a loader without one), and loads it with ``data_dir`` and
``download`` passed as context: float32 finite inputs with the same per-record shape in train and
test, int64 labels in [0, num_classes), one client id per record where there are ids, the same
tensors when loaded twice; an unknown option is refused naming the loader.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedgma.data import DatasetError, load_dataset
from fedgma.registry import DATASETS


def _csv(directory: Path, name: str = "clients.csv", delimiter: str = ",") -> Path:
    rng = np.random.default_rng(0)
    lines = [delimiter.join(["f1", "f2", "label", "client_id"])]
    rows = [[f"{rng.normal():.3f}", f"{rng.normal():.3f}", str(i % 3), f"c{i % 4}"] for i in range(40)]
    lines += [delimiter.join(row) for row in rows]
    path = directory / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _npz(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    path = directory / "clients.npz"
    np.savez(path, x=rng.standard_normal((40, 3, 2)), y=np.arange(40) % 4, client_id=np.arange(40) % 5)
    return path


def _parquet(directory: Path) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = directory / "clients.parquet"
    pq.write_table(pa.table({"a": np.arange(20, dtype=float), "b": np.ones(20), "label": np.arange(20) % 2}), path)
    return path


#: name -> (a folder to write into, the ``files`` fixture of conftest.py) -> (options, data_dir)
GENERATORS: dict[str, Callable[[Path, Any], tuple[dict, str | None]]] = {
    "fashion-mnist": lambda d, f: ({}, str(f.idx_set(d / "f"))),
    "mnist": lambda d, f: ({}, str(f.idx_set(d / "m"))),
    "cifar10": lambda d, f: ({}, str(f.cifar(d / "c", "cifar10"))),
    "cifar100": lambda d, f: ({}, str(f.cifar(d / "c", "cifar100", as_tar=True))),
    "digits": lambda d, f: ({"test_fraction": 0.5}, None),
    "colored-mnist": lambda d, f: ({"clients_per_environment": 2}, str(f.idx_set(d / "m", n_train=40))),
    "colored-fashion-mnist": lambda d, f: ({"downsample": 2}, str(f.idx_set(d / "f", n_train=40))),
    "synthetic": lambda d, f: ({"num_clients": 3, "num_features": 5, "num_classes": 4}, None),
    "femnist": lambda d, f: ({}, str(f.femnist(d / "leaf"))),
    "npz": lambda d, f: ({"path": _npz(d).name}, str(d)),
    "csv": lambda d, f: ({"path": str(_csv(d)), "test_fraction": 0.25}, None),
    "parquet": lambda d, f: ({"path": str(_parquet(d))}, None),
    "file": lambda d, f: ({"path": str(_csv(d, "clients.tsv", "\t"))}, None),
}

NAMES = DATASETS.names()


def load(name: str, directory: Path, files: Any):
    if name not in GENERATORS:
        pytest.fail(f"dataset {name!r} is registered but has no tiny generator in GENERATORS")
    directory.mkdir(parents=True, exist_ok=True)
    options, data_dir = GENERATORS[name](directory, files)
    return load_dataset(name, data_dir=data_dir, download=False, **options)


def test_every_registered_loader_has_a_generator():
    assert sorted(set(NAMES) - set(GENERATORS)) == []
    assert sorted(set(GENERATORS) - set(NAMES)) == []  # no generator for a loader that is gone


@pytest.mark.parametrize("name", NAMES)
def test_loader_gives_valid_splits(name, tmp_path, files):
    splits = load(name, tmp_path, files)
    assert isinstance(splits.num_classes, int) and splits.num_classes >= 1
    assert len(splits.train) > 0
    for split, ids in ((splits.train, splits.train_client_ids), (splits.test, splits.test_client_ids)):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.shape[0] == split.y.shape[0] and split.y.dim() == 1
        assert bool(torch.isfinite(split.x).all())
        if len(split.y):
            assert int(split.y.min()) >= 0 and int(split.y.max()) < splits.num_classes
        if ids is not None:
            assert len(ids) == len(split.y)
    assert splits.train.x.shape[1:] == splits.test.x.shape[1:]


@pytest.mark.parametrize("name", NAMES)
def test_loader_is_deterministic(name, tmp_path, files):
    a, b = load(name, tmp_path / "a", files), load(name, tmp_path / "b", files)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_refused_naming_the_loader(name):
    with pytest.raises(DatasetError, match=rf"^dataset '{name}' has no option 'no_such_option'; it takes: "):
        load_dataset(name, no_such_option=1)


def test_data_dir_and_download_are_context_not_options():
    for name in NAMES:
        assert not {"data_dir", "download"} & set(DATASETS.option_names(name)), name


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("synthetic", {"alpha": -0.1}, "option 'alpha': Input should be greater than or equal to 0"),
        ("synthetic", {"num_clients": 0}, "option 'num_clients': Input should be greater than or equal to 1"),
        ("synthetic", {"test_fraction": 1.0}, "option 'test_fraction': Input should be less than 1"),
        ("digits", {"test_fraction": 0.0}, "option 'test_fraction': Input should be greater than 0"),
        ("colored-mnist", {"train_probabilities": []}, "option 'train_probabilities': .*at least 1 item"),
        ("colored-mnist", {"train_probabilities": [0.9, 1.5]}, "option 'train_probabilities.1': .*less than or equal"),
        ("colored-mnist", {"downsample": 0}, "option 'downsample': Input should be greater than or equal to 1"),
        ("npz", {}, "option 'path': the file to load must be given"),
        ("csv", {"path": "a.csv", "delimiter": ";;"}, "option 'delimiter': .*at most 1 character"),
        ("csv", {"path": "a.csv", "num_classes": 0}, "option 'num_classes': .*greater than or equal to 1"),
        ("file", {"path": "a.csv", "test_fraction": -0.5}, "option 'test_fraction': .*greater than or equal to 0"),
    ],
)
def test_loader_options_are_checked_with_bounds(name, bad, message):
    with pytest.raises(DatasetError, match=rf"^dataset '{name}' {message}"):
        load_dataset(name, **bad)
