"""Dataset loaders. Each returns a :class:`DatasetSplits` of normalised float32 tensors.

Image sets are read from their standard public file formats (IDX for MNIST and Fashion-MNIST),
looked up in ``data_dir``, then in the system locations where Debian's packages put them, and
downloaded only when the caller allows it. A missing or corrupt file gives a
:class:`DatasetError` that says how to get the data, never a crash deep in torch.
"""

from __future__ import annotations

import gzip
import shutil
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits

__all__ = ["DatasetError", "available_datasets", "load_dataset", "read_idx", "register_dataset"]


class DatasetError(ValueError):
    """A dataset could not be found, read or validated; the message says how to fix it."""


# --------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: header says {expected} bytes, file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}

_IDX_SOURCES = {
    "fashion-mnist": {
        "system_dirs": ["/usr/share/datasets/fashion-mnist"],
        "url": "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "hint": "install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
        "pass data.data_dir pointing at the four IDX files, or set data.download = true",
        "mean": 0.2860,
        "std": 0.3530,
    },
    "mnist": {
        "system_dirs": ["/usr/share/datasets/mnist"],
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "hint": "pass data.data_dir pointing at the four MNIST IDX files, or set data.download = true",
        "mean": 0.1307,
        "std": 0.3081,
    },
}


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            shutil.copyfileobj(response, out)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"download of {url} failed: {error}") from None
    partial.replace(target)


def _idx_dataset(name: str, data_dir: str | None, download: bool) -> DatasetSplits:
    source = _IDX_SOURCES[name]
    directories = [Path(data_dir).expanduser()] if data_dir else []
    directories += [Path(d) for d in source["system_dirs"]]
    for directory in directories:
        files = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}
        if all(files.values()):
            break
    else:
        if not download:
            searched = ", ".join(str(d) for d in directories)
            raise DatasetError(f"{name} not found (looked in {searched}); {source['hint']}")
        directory = Path(data_dir or Path.home() / ".cache" / "fedgma" / name).expanduser()
        for stem in _IDX_FILES.values():
            if _find_idx(directory, stem) is None:
                _download(source["url"] + stem + ".gz", directory / f"{stem}.gz")
        files = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}

    arrays = {key: read_idx(path) for key, path in files.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{name}: {split} images have shape {x.shape} and labels {y.shape}; "
                "expected [N, H, W] images and N labels"
            )

    def to_split(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        images = torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)
        images = (images - source["mean"]) / source["std"]
        return ArrayDataset(images, torch.from_numpy(y.astype(np.int64)))

    return DatasetSplits(
        name,
        to_split(arrays["train_x"], arrays["train_y"]),
        to_split(arrays["test_x"], arrays["test_y"]),
        num_classes=10,
    )


# --------------------------------------------------------------------------------------------
# scikit-learn's bundled digits (8x8), needs no files
# --------------------------------------------------------------------------------------------


def _digits(data_dir: str | None, download: bool, test_fraction: float = 0.25, seed: int = 0) -> DatasetSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))  # a fixed split, independent of the run seed
    cut = int(round(len(y) * (1 - test_fraction)))
    train, test = order[:cut], order[cut:]
    images = torch.from_numpy(x).unsqueeze(1)
    labels = torch.from_numpy(y)
    return DatasetSplits(
        "digits",
        ArrayDataset(images[train], labels[train]),
        ArrayDataset(images[test], labels[test]),
        num_classes=10,
    )


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

Loader = Callable[..., DatasetSplits]
_LOADERS: dict[str, Loader] = {
    "fashion-mnist": lambda data_dir=None, download=False, **_: _idx_dataset("fashion-mnist", data_dir, download),
    "mnist": lambda data_dir=None, download=False, **_: _idx_dataset("mnist", data_dir, download),
    "digits": lambda data_dir=None, download=False, **_: _digits(data_dir, download),
}


def register_dataset(name: str, loader: Loader) -> None:
    """Make a loader available by name (``data.dataset`` in a config)."""
    _LOADERS[name] = loader


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, **options) -> DatasetSplits:
    """Load a dataset by name; ``options`` are loader-specific (e.g. Synthetic's α, β)."""
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _LOADERS[name](data_dir=data_dir, download=download, **options)

