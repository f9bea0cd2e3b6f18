"""Checks and assembly shared by the loaders of user-supplied arrays (npz, csv, parquet, LEAF JSON).

Labels must be non-negative integers below ``num_classes``, inputs finite numbers, lengths must
agree; a problem is a :class:`DatasetError` naming the file. :func:`assemble` makes the test split
(per client, when there are client ids) and wraps everything as a :class:`DatasetSplits`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError

__all__ = ["assemble", "check_client_ids", "check_features", "check_labels", "resolve_path"]



def check_features(x: np.ndarray, source: str, what: str = "x") -> np.ndarray:
    """``x`` [N, features...] as finite float32; DatasetError naming ``source`` otherwise."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise DatasetError(f"{source}: {what} must be [N, features...] with N records, got shape {x.shape}")
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DatasetError(f"{source}: {what} must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        raise DatasetError(f"{source}: {what} has {int(bad.sum())} non-finite values (NaN or inf)")
    return x


def check_labels(y: np.ndarray, source: str, n: int, what: str = "y") -> np.ndarray:
    """``y`` as ``n`` int64 labels ≥ 0 (integral floats and booleans accepted); DatasetError otherwise."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{source}: {what} must be {n} labels (one per record), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if y.dtype == bool:
            y = y.astype(np.int64)
        elif not np.issubdtype(y.dtype, np.floating) or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DatasetError(f"{source}: {what} must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise DatasetError(f"{source}: {what} must be ≥ 0, found {int(y.min())}")
    return y


def check_client_ids(ids: np.ndarray | None, source: str, n: int, what: str) -> np.ndarray | None:
    """``ids`` as one client id per record (any dtype), or None; DatasetError on a length mismatch."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise DatasetError(f"{source}: {what} must give one client id per record ({n}), got shape {ids.shape}")
    return ids


def assemble(
    name: str,
    source: str,
    x: np.ndarray,
    y: np.ndarray,
    ids: np.ndarray | None,
    test: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None,
    test_fraction: float,
    seed: int,
    num_classes: int | None,
    metadata: dict | None = None,
) -> DatasetSplits:
    """Validate arrays, make the test split if none is given, and wrap them as :class:`DatasetSplits`.

    Without a separate test set, ``test_fraction`` of the records (of each client, when there are
    client ids, so per-client held-out evaluation works) go to the test split, chosen by ``seed``.
    """
    x = check_features(x, source)
    y = check_labels(y, source, len(x))
    ids = check_client_ids(ids, source, len(x), "client_id")
    if test is not None:
        x_test = check_features(test[0], source, "x_test")
        y_test = check_labels(test[1], source, len(x_test), "y_test")
        test_ids = check_client_ids(test[2], source, len(x_test), "client_id_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(f"{source}: x_test records have shape {x_test.shape[1:]}, x records {x.shape[1:]}")
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise DatasetError(f"{source}: test_fraction must lie in [0, 1), got {test_fraction!r}")
        rng = np.random.default_rng(seed)
        groups = [np.arange(len(y))] if ids is None else [np.flatnonzero(ids == u) for u in np.unique(ids)]
        is_test = np.zeros(len(y), dtype=bool)
        for group in groups:
            is_test[rng.permutation(group)[: int(round(test_fraction * len(group)))]] = True
        x_test, y_test = x[is_test], y[is_test]
        test_ids = None if ids is None else ids[is_test]
        x, y = x[~is_test], y[~is_test]
        ids = None if ids is None else ids[~is_test]
    top = max(int(y.max()) if y.size else -1, int(y_test.max()) if y_test.size else -1)
    if num_classes is None:
        num_classes = top + 1
    elif isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise DatasetError(f"{source}: num_classes must be a positive integer, got {num_classes!r}")
    elif top >= num_classes:
        raise DatasetError(
            f"{source}: labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found {top}"
        )
    if len(y) == 0:
        raise DatasetError(f"{source}: no training records")
    return DatasetSplits(
        name=name,
        train=ArrayDataset(torch.from_numpy(x), torch.from_numpy(y)),
        test=ArrayDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
        num_classes=int(num_classes),
        train_client_ids=ids,
        test_client_ids=test_ids,
        metadata={"source": source, **(metadata or {})},
    )


def resolve_path(path: str | None, data_dir: str | None, kind: str) -> Path:
    """``path`` (relative ones under ``data_dir``) as an existing file; DatasetError naming ``kind`` otherwise."""
    if not path:
        raise DatasetError(f"{kind}: set data.dataset.path (the file to load)")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and data_dir:
        resolved = Path(data_dir).expanduser() / resolved
    if not resolved.is_file():
        raise DatasetError(f"{kind}: file {resolved} not found")
    return resolved

