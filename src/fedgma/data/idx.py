"""MNIST and Fashion-MNIST from their IDX files (LeCun et al. 1998; Xiao, Rasul and Vollgraf 2017).

The four files (train/test images and labels, gzipped or not) are looked up in ``data_dir``, then
where Debian's packages put them, and downloaded only when ``download`` is true. Images come out
as float32 [N, 1, 28, 28], standardised by the set's mean and std; labels int64 in [0, 9].
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError
from fedgma.data.fetch import download as fetch
from fedgma.data.records import check_allocation
from fedgma.registry import DATASETS, NoOptions

__all__ = ["load_idx_dataset", "read_idx"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its length.

    The header is read first and the data read only up to the size it claims, so a forged header
    or a decompression bomb cannot allocate more than the header says, and a header claiming more
    than the machine's memory is refused before reading. Raises DatasetError naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            magic = handle.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_DTYPES:
                raise DatasetError(f"{path} is not an IDX file (bad magic number)")
            ndim = magic[3]
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DatasetError(f"{path} is truncated: header needs {4 + 4 * ndim} bytes, file has fewer")
            shape = tuple(int.from_bytes(dims[4 * i : 4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(_IDX_DTYPES[magic[2]])
            size = int(np.prod(shape, dtype=object)) * dtype.itemsize
            check_allocation(size, str(path), f"its header's shape {shape}")
            raw = handle.read(size + 1)
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read IDX file {path}: {error}") from None
    header = 4 + 4 * ndim
    if len(raw) != size:
        raise DatasetError(
            f"{path} is truncated or corrupt: header says {header + size} bytes, file has "
            f"{header + len(raw)}{' or more' if len(raw) > size else ''}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


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
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / f"{dotted}.gz", directory / dotted):
        if candidate.is_file():
            return candidate
    return None


def load_idx_dataset(name: str, data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    """``name`` ("fashion-mnist" or "mnist") from its IDX files; DatasetError when missing or corrupt."""
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
                fetch(source["url"] + stem + ".gz", directory / f"{stem}.gz")
        files = {key: _find_idx(directory, stem) for key, stem in _IDX_FILES.items()}

    arrays = {key: read_idx(path) for key, path in files.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DatasetError(
                f"{name}: {split} images have shape {x.shape} and labels {y.shape}; "
                "expected [N, H, W] images and N labels"
            )
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DatasetError(f"{name}: {split} images and labels must be unsigned bytes, got {x.dtype} and {y.dtype}")
        if y.size and y.max() >= 10:
            raise DatasetError(
                f"{name}: {split} labels must lie in [0, 9], found a {int(y.max())} in {files[split + '_y']}"
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



def _fashion_mnist(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    return load_idx_dataset("fashion-mnist", data_dir, download)


def _mnist(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    return load_idx_dataset("mnist", data_dir, download)


DATASETS.register("fashion-mnist", _fashion_mnist, NoOptions, "Fashion-MNIST, 60,000 + 10,000 28x28 grey images")
DATASETS.register("mnist", _mnist, NoOptions, "MNIST digits, 60,000 + 10,000 28x28 grey images")
