"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from their python-pickle batches.

Read from the extracted folder or straight from the tarball, looked up in ``data_dir`` then the
system locations, downloaded only when ``download`` is true. Images come out as float32
[N, 3, 32, 32] normalised per channel; labels int64 (10 classes, or CIFAR-100's 100 fine labels).
Only numpy arrays, lists and dicts are unpickled, so a tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError
from fedgma.data.fetch import download as fetch
from fedgma.registry import DATASETS, NoOptions

__all__ = ["load_cifar", "read_cifar_batch"]

_CIFAR_SOURCES = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "tarball": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "num_classes": 10,
        "system_dirs": ["/usr/share/datasets/cifar10", "/usr/share/datasets/cifar-10"],
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "tarball": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "num_classes": 100,
        "system_dirs": ["/usr/share/datasets/cifar100", "/usr/share/datasets/cifar-100"],
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "mean": (0.5071, 0.4865, 0.4409),
        "std": (0.2673, 0.2564, 0.2762),
    },
}

# The CIFAR pickles hold a dict of numpy arrays and lists; nothing else may be loaded from them.
_SAFE_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's signature
        if (module, name) in _SAFE_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (CIFAR batches hold only arrays)")


def read_cifar_batch(raw: bytes, source: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one CIFAR python-pickle batch into uint8 images [N, 3, 32, 32] and int64 labels.

    ``source`` names the file in error messages. Only numpy arrays, lists and dicts are unpickled,
    so a tampered file cannot run code.
    """
    try:
        batch = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DatasetError(f"{source} is truncated or corrupt (not a CIFAR pickle batch): {error}") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{source} is not a CIFAR batch: expected a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DatasetError(f"{source} is not a CIFAR batch: needs keys 'data' and {label_key!r}, has {sorted(batch)}")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{source}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    if labels.ndim != 1 or len(labels) != len(data) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise DatasetError(f"{source}: {label_key!r} must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(
            f"{source}: labels must lie in [0, {num_classes - 1}], found [{labels.min()}, {labels.max()}]"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _cifar_reader(directories: list[Path], source: dict) -> Callable[[str], tuple[bytes, str]] | None:
    """A function returning (bytes, name) of a batch file, from the first directory holding the set."""
    files = source["train"] + source["test"]
    for directory in directories:
        for folder in (directory / source["folder"], directory):
            if all((folder / f).is_file() for f in files):
                return lambda f, folder=folder: ((folder / f).read_bytes(), str(folder / f))
        tarball = directory / source["tarball"]
        if tarball.is_file():
            return _tar_reader(tarball, source["folder"])
    return None


def _tar_reader(tarball: Path, folder: str) -> Callable[[str], tuple[bytes, str]]:
    def read(member: str) -> tuple[bytes, str]:
        name = f"{tarball}:{folder}/{member}"
        try:
            with tarfile.open(tarball, "r:*") as archive:
                handle = archive.extractfile(f"{folder}/{member}")
                if handle is None:
                    raise DatasetError(f"{name} is not a regular file in the archive")
                return handle.read(), name
        except KeyError:
            raise DatasetError(f"{tarball} has no member {folder}/{member}; is it the right archive?") from None
        except (tarfile.TarError, OSError, EOFError, gzip.BadGzipFile) as error:
            raise DatasetError(f"{tarball} is truncated or corrupt: {error}") from None

    return read


def load_cifar(name: str, data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    """``name`` ("cifar10" or "cifar100"); DatasetError when missing or corrupt."""
    source = _CIFAR_SOURCES[name]
    directories = [Path(data_dir).expanduser()] if data_dir else []
    directories += [Path(d) for d in source["system_dirs"]]
    reader = _cifar_reader(directories, source)
    if reader is None:
        if not download:
            searched = ", ".join(str(d) for d in directories)
            raise DatasetError(
                f"{name} not found (looked in {searched} for {source['folder']}/ or {source['tarball']}); "
                f"download {source['url']} into data.data_dir, or set data.download = true"
            )
        directory = Path(data_dir or Path.home() / ".cache" / "fedgma" / name).expanduser()
        fetch(source["url"], directory / source["tarball"])
        reader = _tar_reader(directory / source["tarball"], source["folder"])

    def split(files: list[str]) -> ArrayDataset:
        parts = [read_cifar_batch(*reader(f), source["label_key"], source["num_classes"]) for f in files]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255.0)
        mean = torch.tensor(source["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(source["std"]).view(1, 3, 1, 1)
        return ArrayDataset((images - mean) / std, torch.from_numpy(np.concatenate([p[1] for p in parts])))

    return DatasetSplits(
        name,
        split(source["train"]),
        split(source["test"]),
        num_classes=source["num_classes"],
        metadata={"mean": source["mean"], "std": source["std"]},
    )



def _cifar10(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    return load_cifar("cifar10", data_dir, download)


def _cifar100(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    return load_cifar("cifar100", data_dir, download)


DATASETS.register("cifar10", _cifar10, NoOptions, "CIFAR-10, 50,000 + 10,000 32x32 colour images, 10 classes")
DATASETS.register("cifar100", _cifar100, NoOptions, "CIFAR-100, 50,000 + 10,000 32x32 colour images, 100 classes")
