"""Small generated data files in the public formats the loaders read (IDX, CIFAR pickles, npz, CSV, LEAF JSON)."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``compress``."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_idx_set(directory: Path, n_train: int = 30, n_test: int = 10, seed: int = 0, compress: bool = True) -> Path:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, compress)
    return directory


def cifar_batch(n: int, num_classes: int, label_key: str, seed: int, bytes_keys: bool) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {
        "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
        label_key: [int(v) for v in np.arange(n) % num_classes],
        "batch_label": "generated",
    }
    if bytes_keys:  # the real files are Python 2 pickles, whose keys load as bytes
        batch = {k.encode(): v for k, v in batch.items()}
    return pickle.dumps(batch, protocol=2)


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", 10),
    "cifar100": ("cifar-100-python", ["train", "test"], "fine_labels", 100),
}
CIFAR_TARBALL = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


def make_cifar(directory: Path, variant: str = "cifar10", per_file: int = 4, as_tar: bool = False) -> Path:
    folder, files, label_key, classes = CIFAR_LAYOUT[variant]
    directory.mkdir(parents=True, exist_ok=True)
    contents = {f: cifar_batch(per_file, classes, label_key, i, bytes_keys=(i % 2 == 0)) for i, f in enumerate(files)}
    if as_tar:
        with tarfile.open(directory / CIFAR_TARBALL[variant], "w:gz") as archive:
            for name, raw in contents.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(raw)
                archive.addfile(info, io.BytesIO(raw))
    else:
        (directory / folder).mkdir(exist_ok=True)
        for name, raw in contents.items():
            (directory / folder / name).write_bytes(raw)
    return directory


def make_femnist(directory: Path, writers: int = 3, per_writer: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_writer), ("test", 2)):
        (directory / split).mkdir(parents=True, exist_ok=True)
        users = [f"f{w:04d}_{w}" for w in range(writers)]
        content = {
            "users": users,
            "num_samples": [count] * writers,
            "user_data": {
                u: {"x": rng.random((count, 784)).round(3).tolist(), "y": rng.integers(0, 62, count).tolist()}
                for u in users
            },
        }
        (directory / split / f"all_data_0_niid_{split}.json").write_text(json.dumps(content))
    return directory


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    return make_idx_set(tmp_path / "mnist")


@pytest.fixture
def femnist_dir(tmp_path: Path) -> Path:
    return make_femnist(tmp_path / "femnist")


@pytest.fixture
def files():
    """The generators above, for tests that need variants (tarballs, raw IDX, CIFAR-100, ...)."""

    class Files:
        idx_set = staticmethod(make_idx_set)
        idx = staticmethod(write_idx)
        cifar = staticmethod(make_cifar)
        cifar_batch = staticmethod(cifar_batch)
        femnist = staticmethod(make_femnist)

    return Files
