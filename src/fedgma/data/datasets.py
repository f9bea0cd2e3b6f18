"""Dataset loaders. Each returns a :class:`DatasetSplits` of normalised float32 tensors.

Image sets are read from their standard public file formats (IDX for MNIST and Fashion-MNIST,
the python-pickle batches for CIFAR-10/100), looked up in ``data_dir``, then in the system
locations where Debian's packages put them, and downloaded only when the caller allows it. A
missing or corrupt file gives a :class:`DatasetError` that says how to get the data, never a
crash deep in torch. Naturally partitioned sets (Synthetic(α, β), LEAF FEMNIST, user ``.npz`` /
``.csv`` / Parquet files) live in :mod:`fedgma.data.natural` and are registered here by name, as
are the Colored MNIST environments of :mod:`fedgma.data.domains`.
"""

from __future__ import annotations

import difflib
import gzip
import inspect
import io
import pickle
import shutil
import tarfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for candidate in (directory / f"{stem}.gz", directory / stem, directory / f"{dotted}.gz", directory / dotted):
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


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python-pickle batches, from the directory or straight from the tarball)
# --------------------------------------------------------------------------------------------

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


def _cifar(name: str, data_dir: str | None, download: bool) -> DatasetSplits:
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
        _download(source["url"], directory / source["tarball"])
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
    "fashion-mnist": lambda data_dir=None, download=False: _idx_dataset("fashion-mnist", data_dir, download),
    "mnist": lambda data_dir=None, download=False: _idx_dataset("mnist", data_dir, download),
    "digits": lambda data_dir=None, download=False: _digits(data_dir, download),
}


def _cifar10(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    """CIFAR-10 (Krizhevsky 2009): 50,000 + 10,000 32×32 colour images, 10 classes, normalised per channel."""
    return _cifar("cifar10", data_dir, download)


def _cifar100(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    """CIFAR-100 (Krizhevsky 2009) with its 100 fine labels, normalised per channel."""
    return _cifar("cifar100", data_dir, download)


def _colored(base: str) -> Loader:
    def loader(
        data_dir: str | None = None,
        download: bool = False,
        train_probabilities: tuple[float, ...] = (0.9, 0.8),
        test_probability: float = 0.1,
        label_noise: float = 0.25,
        seed: int = 0,
        clients_per_environment: int = 1,
        downsample: int = 1,
    ) -> DatasetSplits:
        """IRM Colored MNIST environments (Arjovsky et al. 2019) built on a grey image set."""
        from fedgma.data.domains import colored_splits

        return colored_splits(
            _LOADERS[base](data_dir=data_dir, download=download),
            tuple(train_probabilities),
            test_probability,
            label_noise,
            seed,
            clients_per_environment=clients_per_environment,
            downsample=downsample,
        )

    return loader


_LOADERS.update(
    {
        "cifar10": _cifar10,
        "cifar100": _cifar100,
        "colored-mnist": _colored("mnist"),
        "colored-fashion-mnist": _colored("fashion-mnist"),
    }
)


def register_dataset(name: str, loader: Loader) -> None:
    """Make a loader available by name (``data.dataset`` in a config)."""
    _LOADERS[name] = loader


def available_datasets() -> list[str]:
    return sorted(_LOADERS)


def loader_options(name: str) -> list[str] | None:
    """The options dataset ``name``'s loader takes (beyond data_dir and download), sorted.

    None when that cannot be known: the loader has no signature, or passes ``**kwargs`` on and
    checks them itself.
    """
    if name not in _LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    try:
        parameters = inspect.signature(_LOADERS[name]).parameters
    except (TypeError, ValueError):  # builtins and some callables have no signature
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return sorted(set(parameters) - {"data_dir", "download"})


def check_options(name: str, options: dict[str, Any]) -> None:
    """Raise :class:`DatasetError` naming every option that dataset ``name``'s loader does not take.

    Called when a config is read, so a misspelt ``[data.options]`` key stops a sweep before it
    starts.
    """
    accepted = loader_options(name)
    if accepted is None:
        return
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        close = {o: difflib.get_close_matches(o, accepted, n=1, cutoff=0.6) for o in unknown}
        hints = [f"{match[0]!r} for {o!r}" for o, match in close.items() if match]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise DatasetError(
            f"dataset {name!r} does not take option(s) {', '.join(unknown)}{hint}; "
            f"it takes: {', '.join(accepted) or 'no options'}"
        )


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, **options: Any) -> DatasetSplits:
    """Load a dataset by name; ``options`` are loader-specific (e.g. Synthetic's α, β).

    An option the loader does not take is a :class:`DatasetError` naming the options it does take.
    """
    check_options(name, options)
    return _LOADERS[name](data_dir=data_dir, download=download, **options)


# Registers synthetic, femnist, npz, csv, parquet and file (imported last: it uses DatasetError).
import fedgma.data.natural  # noqa: E402, F401
