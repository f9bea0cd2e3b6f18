"""Checks and assembly shared by the loaders of user-supplied arrays (npz, csv, parquet, LEAF JSON).

Labels must be non-negative integers below ``num_classes``, inputs finite numbers, lengths must
agree; a problem is a :class:`DatasetError` naming the file. :func:`assemble` makes the test split
(per client, when there are client ids) and wraps everything as a :class:`DatasetSplits`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError

__all__ = [
    "MAX_ABS_FEATURE", "MAX_CLASSES", "assemble", "check_allocation", "check_client_ids", "check_features",
    "check_labels", "memory_limit", "resolve_path",
]



#: Largest |value| an input may have: squares of values up to 1e15 summed over 10^8 entries stay finite in
#: float32 (max 3.4e38), so batch statistics and losses cannot overflow. Larger values are a unit or file error.
MAX_ABS_FEATURE = 1e15
#: Most classes a data set may have (and the largest label + 1): a bound on the model's output layer and on
#: per-class tables, so one stray label such as 10^9 cannot allocate gigabytes.
MAX_CLASSES = 100_000


def _first(mask: np.ndarray) -> int:
    """Index of the first record [N, ...] with a True anywhere in ``mask``."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def check_features(x: np.ndarray, source: str, what: str = "x") -> np.ndarray:
    """``x`` [N, features...] (real numbers or booleans) as float32; DatasetError naming ``source`` otherwise.

    Refused, in one line naming the record (0-based index into ``x``): no features (shape [N, 0]),
    a complex, text or object dtype, a non-finite value (NaN, ±inf, or beyond float32's range), or a
    value with |v| > :data:`MAX_ABS_FEATURE`.
    """
    x = np.asarray(x)
    if x.ndim < 2:
        raise DatasetError(f"{source}: {what} must be [N, features...] with N records, got shape {x.shape}")
    if int(np.prod(x.shape[1:])) == 0:
        raise DatasetError(f"{source}: {what} has shape {x.shape}: records with no features")
    if np.iscomplexobj(x):
        raise DatasetError(f"{source}: {what} holds complex numbers (dtype {x.dtype}); give real-valued features")
    if x.dtype == object or not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise DatasetError(f"{source}: {what} must be numeric, got dtype {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer):
        wide = x.astype(np.float64, copy=False)
        bad = ~np.isfinite(wide)
        if bad.any():
            record = _first(bad)
            value = wide[record].reshape(-1)[np.flatnonzero(bad[record].reshape(-1))[0]]
            raise DatasetError(
                f"{source}: {what} record {record} has a non-finite value ({value}); inputs must be finite"
            )
        huge = np.abs(wide) > MAX_ABS_FEATURE
        if huge.any():
            record = _first(huge)
            value = wide[record].reshape(-1)[np.flatnonzero(huge[record].reshape(-1))[0]]
            raise DatasetError(
                f"{source}: {what} record {record} has the value {value:g}, beyond ±{MAX_ABS_FEATURE:g}; "
                "rescale the inputs (a unit or file error?)"
            )
    return x.astype(np.float32)


def check_labels(y: np.ndarray, source: str, n: int, what: str = "y") -> np.ndarray:
    """``y`` as ``n`` int64 labels in [0, :data:`MAX_CLASSES`) (integral floats and booleans accepted).

    Raises DatasetError, naming ``source`` and the first bad record, for a wrong shape, a
    non-integer, negative or non-finite label, or one ≥ MAX_CLASSES (checked before anything is
    sized by the labels).
    """
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise DatasetError(f"{source}: {what} must be {n} labels (one per record), got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if y.dtype == bool:
            y = y.astype(np.int64)
        elif not np.issubdtype(y.dtype, np.floating):
            raise DatasetError(f"{source}: {what} must hold integer class labels, got dtype {y.dtype}")
        else:
            bad = ~np.isfinite(y) | (y != np.round(y))
            if bad.any():
                record = int(np.flatnonzero(bad)[0])
                raise DatasetError(f"{source}: {what} record {record} is {y[record]}, not an integer class label")
    bad = (y < 0) | (y >= MAX_CLASSES) if y.size else np.zeros(0, dtype=bool)
    if bad.any():
        record = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{source}: {what} record {record} is {y[record]:g}; labels must be class indices in [0, {MAX_CLASSES})"
            if np.issubdtype(y.dtype, np.floating)
            else f"{source}: {what} record {record} is {y[record]}; labels must be class indices in [0, {MAX_CLASSES})"
        )
    return y.astype(np.int64)


def check_client_ids(ids: np.ndarray | None, source: str, n: int, what: str) -> np.ndarray | None:
    """``ids`` as one client id per record, or None; DatasetError naming the record for a length mismatch,
    a missing id (NaN, None, an empty string) or a complex or non-finite number."""
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise DatasetError(f"{source}: {what} must give one client id per record ({n}), got shape {ids.shape}")
    if np.iscomplexobj(ids):
        raise DatasetError(f"{source}: {what} holds complex numbers; client ids must be integers or text")
    if ids.dtype.kind == "f":
        missing = ~np.isfinite(ids)
    elif ids.dtype.kind in "US":
        missing = np.char.strip(ids.astype(str)) == ""
    elif ids.dtype == object:
        missing = np.array(
            [v is None or (isinstance(v, float) and not np.isfinite(v)) or (isinstance(v, str) and not v.strip())
             for v in ids],
            dtype=bool,
        )
    else:
        missing = np.zeros(len(ids), dtype=bool)
    if missing.any():
        record = int(np.flatnonzero(missing)[0])
        raise DatasetError(
            f"{source}: {what} of record {record} is missing ({ids[record]}); every record needs a client id"
        )
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
    records = len(y) + len(y_test)
    if num_classes is None:
        num_classes = top + 1
        if num_classes > records:
            raise DatasetError(
                f"{source}: labels go up to {top} but there are only {records} records, so most classes would have "
                f"none; if there really are {num_classes} classes, set num_classes = {num_classes}"
            )
    elif isinstance(num_classes, bool) or int(num_classes) != num_classes or not 1 <= num_classes <= MAX_CLASSES:
        raise DatasetError(f"{source}: num_classes must be an integer in [1, {MAX_CLASSES}], got {num_classes!r}")
    elif top >= num_classes:
        raise DatasetError(
            f"{source}: labels must lie in [0, {num_classes - 1}] (num_classes={num_classes}), found {top}"
        )
    if len(y) == 0:
        raise DatasetError(f"{source}: no training records (a header-only or empty file?)")
    if len(y_test) == 0:
        raise DatasetError(
            f"{source}: the test set has no records; give test records (x_test / y_test, or a test_path file)"
            if test is not None
            else f"{source}: test_fraction = {test_fraction:g} holds out no test records"
            + (" (per client, round(test_fraction × its records) is 0)" if ids is not None else "")
            + "; set data.dataset.test_fraction > 0 (e.g. 0.2) or give a separate test set"
        )
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


def memory_limit() -> int:
    """Bytes of physical memory (os.sysconf), or 1 TiB where the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 1 << 40


def check_allocation(nbytes: int, source: str, what: str) -> None:
    """DatasetError naming ``source`` when ``nbytes`` (claimed by a file's header) exceed the machine's memory."""
    limit = memory_limit()
    if nbytes > limit:
        raise DatasetError(
            f"{source}: {what} would need {nbytes / 2**30:,.1f} GiB, more than this machine's "
            f"{limit / 2**30:,.1f} GiB of memory; the header is corrupt or forged, or the data too large"
        )
