"""Datasets that come with their own clients: Synthetic(α, β), LEAF FEMNIST and user files.

Each loader returns a :class:`DatasetSplits` whose ``train_client_ids`` / ``test_client_ids`` give
the natural partition (split it with :func:`fedgma.data.partition.natural`); user files without a
client id column leave them ``None`` and are partitioned like any other set. All loaders are
registered in :mod:`fedgma.data.datasets`: ``synthetic``, ``femnist``, ``npz``, ``csv``,
``parquet`` and ``file`` (chosen by the file's extension).

Every file is checked before use: labels must be non-negative integers below ``num_classes``,
inputs finite numbers, lengths must agree; a problem is a :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import csv
import inspect
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError, register_dataset

__all__ = ["load_csv", "load_femnist", "load_npz", "load_parquet", "load_table_file", "synthetic"]


# --------------------------------------------------------------------------------------------
# Synthetic(α, β) of Li et al. 2020 (FedProx)
# --------------------------------------------------------------------------------------------


def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int = 30,
    seed: int = 0,
    iid: bool = False,
    test_fraction: float = 0.1,
    num_features: int = 60,
    num_classes: int = 10,
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """Synthetic(α, β): Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization
    in Heterogeneous Networks" (FedProx), §5.1, following their ``generate_synthetic`` code.

    For client k: u_k ~ N(0, α²), W_k ~ N(u_k, 1) [features × classes], b_k ~ N(u_k, 1);
    B_k ~ N(0, β²), v_k ~ N(B_k, 1) per feature, x ~ N(v_k, Σ) with Σ = diag(j^−1.2);
    y = argmax softmax(W_kᵀx + b_k). α controls how much the local models differ, β how much the
    local inputs differ (as in their code, α and β are standard deviations). Client sizes are
    ⌊lognormal(4, 2)⌋ + 50. ``iid=True`` is their Synthetic-IID: one shared W, b ~ N(0, 1) and
    x ~ N(B_k, Σ) (use β = 0 for identical inputs). Each client's records are shuffled and its last
    ``test_fraction`` (10% in their code) is its test split, so ``test_client_ids`` allows held-out
    per-client evaluation. Deterministic in ``seed``; ``data_dir`` and ``download`` are unused.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not np.isfinite(value) or value < 0:
            raise DatasetError(f"synthetic: {name} must be a finite number ≥ 0, got {value!r}")
    for name, value in (("num_clients", num_clients), ("num_features", num_features), ("num_classes", num_classes)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise DatasetError(f"synthetic: {name} must be a positive integer, got {value!r}")
    if not 0.0 <= test_fraction < 1.0:
        raise DatasetError(f"synthetic: test_fraction must lie in [0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    mean_w = rng.normal(0, alpha, num_clients)
    offsets = rng.normal(0, beta, num_clients)
    scale = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt of Σ's diagonal j^-1.2
    if iid:
        w_global = rng.normal(0, 1, (num_features, num_classes))
        b_global = rng.normal(0, 1, num_classes)
    xs, ys, train_mask = [], [], []
    for k in range(num_clients):
        mean_x = np.full(num_features, offsets[k]) if iid else rng.normal(offsets[k], 1, num_features)
        w = w_global if iid else rng.normal(mean_w[k], 1, (num_features, num_classes))
        b = b_global if iid else rng.normal(mean_w[k], 1, num_classes)
        x = mean_x + scale * rng.standard_normal((sizes[k], num_features))
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone: argmax of the logits
        mask = np.zeros(sizes[k], dtype=bool)
        mask[: int((1 - test_fraction) * sizes[k])] = True
        train_mask.append(
            mask
        )  # records are i.i.d. within a client, so the first ones serve as the shuffled train part
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    owner = np.repeat(np.arange(num_clients), sizes)
    train = np.concatenate(train_mask)
    return DatasetSplits(
        name="synthetic",
        train=ArrayDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
        test=ArrayDataset(torch.from_numpy(x[~train]), torch.from_numpy(y[~train])),
        num_classes=int(num_classes),
        train_client_ids=owner[train],
        test_client_ids=owner[~train],
        metadata={"alpha": float(alpha), "beta": float(beta), "iid": bool(iid), "seed": seed, "sizes": sizes.tolist()},
    )


# --------------------------------------------------------------------------------------------
# Shared checks for user-supplied arrays
# --------------------------------------------------------------------------------------------


def _features(x: np.ndarray, source: str, what: str = "x") -> np.ndarray:
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


def _labels(y: np.ndarray, source: str, n: int, what: str = "y") -> np.ndarray:
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


def _client_ids(ids: np.ndarray | None, source: str, n: int, what: str) -> np.ndarray | None:
    if ids is None:
        return None
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise DatasetError(f"{source}: {what} must give one client id per record ({n}), got shape {ids.shape}")
    return ids


def _assemble(
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
    x = _features(x, source)
    y = _labels(y, source, len(x))
    ids = _client_ids(ids, source, len(x), "client_id")
    if test is not None:
        x_test = _features(test[0], source, "x_test")
        y_test = _labels(test[1], source, len(x_test), "y_test")
        test_ids = _client_ids(test[2], source, len(x_test), "client_id_test")
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


def _resolve(path: str | None, data_dir: str | None, kind: str) -> Path:
    if not path:
        raise DatasetError(f"{kind}: set data.options.path (the file to load)")
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and data_dir:
        resolved = Path(data_dir).expanduser() / resolved
    if not resolved.is_file():
        raise DatasetError(f"{kind}: file {resolved} not found")
    return resolved


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------


def load_npz(
    path: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> DatasetSplits:
    """A NumPy ``.npz`` archive: arrays ``x`` [N, ...] and ``y`` [N], optionally ``client_id`` [N],
    and optionally a test set ``x_test``, ``y_test`` (and ``client_id_test``); without one,
    ``test_fraction`` of the records (per client) are held out, chosen by ``seed``.
    Object arrays are refused (``allow_pickle=False``).
    """
    file = _resolve(path, data_dir, "npz")
    try:
        with np.load(file, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{file} is not a readable .npz archive (truncated or corrupt?): {error}") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DatasetError(f"{file} lacks array(s) {', '.join(missing)}; it has {', '.join(sorted(arrays)) or 'none'}")
    has_test = "x_test" in arrays or "y_test" in arrays
    if has_test and not ("x_test" in arrays and "y_test" in arrays):
        raise DatasetError(f"{file}: give both x_test and y_test, or neither")
    test = (arrays["x_test"], arrays["y_test"], arrays.get("client_id_test")) if has_test else None
    return _assemble(
        file.stem, str(file), arrays["x"], arrays["y"], arrays.get("client_id"), test, test_fraction, seed, num_classes
    )


# --------------------------------------------------------------------------------------------
# Tables: .csv and Parquet
# --------------------------------------------------------------------------------------------


def _read_csv(file: Path, delimiter: str) -> dict[str, np.ndarray]:
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter=delimiter))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read CSV file {file}: {error}") from None
    if not rows:
        raise DatasetError(f"{file} is empty: expected a header row and records")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if len(set(header)) != len(header):
        raise DatasetError(f"{file}: header has duplicate column names: {header}")
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DatasetError(f"{file} line {number}: {len(row)} fields, header has {len(header)} (truncated file?)")
    table = np.asarray(body, dtype=str).reshape(len(body), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}


def _read_parquet(file: Path) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(
            f"reading {file} needs pyarrow: install it with `pip install 'fedgma[parquet]'` (or `pip install pyarrow`)"
        ) from None
    try:
        table = pq.read_table(file)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DatasetError(f"{file} is not a readable Parquet file (truncated or corrupt?): {error}") from None
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def _numeric(values: np.ndarray, source: str, column: str) -> np.ndarray:
    if values.dtype.kind in "iufb":
        return values
    try:
        return values.astype(np.float64)
    except ValueError:
        for row, value in enumerate(values):
            try:
                float(value)
            except (TypeError, ValueError):
                raise DatasetError(
                    f"{source}: column {column!r} row {row + 1} is not a number: {str(value)!r}"
                ) from None
        raise


def _table_splits(
    columns: dict[str, np.ndarray],
    source: str,
    name: str,
    label_column: str,
    client_column: str | None,
    feature_columns: Sequence[str] | None,
    test_columns: dict[str, np.ndarray] | None,
    test_fraction: float,
    seed: int,
    num_classes: int | None,
) -> DatasetSplits:
    if client_column is None and "client_id" in columns:
        client_column = "client_id"
    for column in [label_column] + ([client_column] if client_column else []) + list(feature_columns or []):
        if column not in columns:
            raise DatasetError(f"{source}: no column {column!r}; columns are {', '.join(columns)}")
    features = (
        list(feature_columns) if feature_columns else [c for c in columns if c not in (label_column, client_column)]
    )
    if not features:
        raise DatasetError(f"{source}: no feature columns besides {label_column!r}")
    raw_labels = columns[label_column]
    classes: list | None = None
    if raw_labels.dtype.kind in "USO":
        try:
            labels = _numeric(raw_labels, source, label_column)
        except DatasetError:  # text labels: map the sorted names to 0 … C−1
            names = [raw_labels] + ([test_columns[label_column]] if test_columns else [])
            classes_array, _ = np.unique(np.concatenate(names).astype(str), return_inverse=True)
            classes = classes_array.tolist()
            labels = np.searchsorted(classes_array, raw_labels.astype(str))
    else:
        labels = raw_labels

    def pick(table: dict[str, np.ndarray], table_source: str, y: np.ndarray | None = None):
        x = np.stack([_numeric(table[c], table_source, c) for c in features], axis=1)
        if y is None:
            y = table[label_column]
            y = np.searchsorted(classes, y.astype(str)) if classes is not None else y
            if classes is None and y.dtype.kind in "USO":
                y = _numeric(y, table_source, label_column)
        ids = table[client_column] if client_column else None
        return x, y, ids

    x, y, ids = pick(columns, source, labels)
    test = None
    if test_columns is not None:
        missing = [c for c in features + [label_column] if c not in test_columns]
        if missing:
            raise DatasetError(f"test file for {source} lacks column(s) {', '.join(missing)}")
        test = pick(test_columns, f"test file for {source}")
    metadata = {"features": features, "label_column": label_column, "client_column": client_column}
    if classes is not None:
        metadata["classes"] = classes
    return _assemble(name, source, x, y, ids, test, test_fraction, seed, num_classes, metadata)


def load_csv(
    path: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    label_column: str = "label",
    client_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    delimiter: str = ",",
) -> DatasetSplits:
    """A CSV table with a header: feature columns, a label column and optionally a client id column.

    Features are every column but the label and client columns unless ``feature_columns`` names
    them. ``client_column`` defaults to ``client_id`` when such a column exists. Integer labels are
    used as they are; text labels are mapped to 0 … C−1 in sorted order (``metadata["classes"]``).
    ``test_path`` names a test table with the same columns; without it ``test_fraction`` of the
    records (per client) are held out, chosen by ``seed``.
    """
    file = _resolve(path, data_dir, "csv")
    test = _read_csv(_resolve(test_path, data_dir, "csv test_path"), delimiter) if test_path else None
    return _table_splits(
        _read_csv(file, delimiter),
        str(file),
        file.stem,
        label_column,
        client_column,
        feature_columns,
        test,
        test_fraction,
        seed,
        num_classes,
    )


def load_parquet(
    path: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    label_column: str = "label",
    client_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
) -> DatasetSplits:
    """A Parquet table, with the same columns and options as :func:`load_csv` (needs pyarrow)."""
    file = _resolve(path, data_dir, "parquet")
    test = _read_parquet(_resolve(test_path, data_dir, "parquet test_path")) if test_path else None
    return _table_splits(
        _read_parquet(file),
        str(file),
        file.stem,
        label_column,
        client_column,
        feature_columns,
        test,
        test_fraction,
        seed,
        num_classes,
    )


def load_table_file(path: str | None = None, data_dir: str | None = None, download: bool = False, **options):
    """Load a user file by its extension: ``.npz``, ``.csv`` (or ``.tsv``) or ``.parquet``."""
    file = _resolve(path, data_dir, "file")
    suffix = file.suffix.lower()
    loaders = {".npz": load_npz, ".csv": load_csv, ".tsv": load_csv, ".parquet": load_parquet, ".pq": load_parquet}
    if suffix not in loaders:
        raise DatasetError(f"{file}: unknown file type {suffix!r}; use .npz, .csv, .tsv or .parquet")
    loader = loaders[suffix]
    accepted = set(inspect.signature(loader).parameters) - {"path", "data_dir", "download"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DatasetError(
            f"{file}: {suffix} files do not take option(s) {', '.join(unknown)}; they take {sorted(accepted)}"
        )
    if suffix == ".tsv":
        options.setdefault("delimiter", "\t")
    return loader(str(file), data_dir, download, **options)


# --------------------------------------------------------------------------------------------
# LEAF FEMNIST (JSON)
# --------------------------------------------------------------------------------------------

_FEMNIST_HINT = (
    "generate it with LEAF (https://github.com/TalwalkarLab/leaf: in data/femnist run "
    "`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample`) and set data.data_dir to the folder holding "
    "its train/ and test/ directories of .json files"
)


def _read_leaf_json(file: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{file} is not readable LEAF JSON (truncated or corrupt?): {error}") from None
    if not isinstance(content, dict) or not {"users", "user_data"} <= set(content):
        raise DatasetError(f"{file} is not a LEAF file: expected keys 'users', 'num_samples', 'user_data'")
    users, data = content["users"], content["user_data"]
    counts = content.get("num_samples", [None] * len(users))
    if not isinstance(users, list) or not isinstance(data, dict) or len(counts) != len(users):
        raise DatasetError(f"{file}: 'users' and 'num_samples' must be lists of equal length, 'user_data' a dict")
    xs, ys = [], []
    for user, count in zip(users, counts, strict=True):
        record = data.get(user)
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise DatasetError(f"{file}: user {user!r} has no 'x' and 'y' in user_data")
        try:
            x = np.asarray(record["x"], dtype=np.float32)
            y = np.asarray(record["y"])
        except (TypeError, ValueError) as error:
            raise DatasetError(f"{file}: user {user!r} has malformed x or y: {error}") from None
        if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
            raise DatasetError(f"{file}: user {user!r} needs x of [n, 784] and n labels, got {x.shape} and {y.shape}")
        if count is not None and count != len(y):
            raise DatasetError(f"{file}: user {user!r} has num_samples {count} but {len(y)} records")
        xs.append(x)
        ys.append(_labels(y, f"{file} user {user!r}", len(x)))
    return [str(u) for u in users], xs, ys


def load_femnist(data_dir: str | None = None, download: bool = False) -> DatasetSplits:
    """LEAF FEMNIST (Caldas et al. 2018): 28×28 handwritten characters, 62 classes, one client per writer.

    Reads every ``train/*.json`` and ``test/*.json`` under ``data_dir`` (or ``data_dir/data``, LEAF's
    layout). Writers are the natural client ids (``train_client_ids`` / ``test_client_ids``; LEAF's
    sample-based split gives each writer train and test records). Inputs are standardised with
    the training set's mean and std (``metadata``); images are [N, 1, 28, 28].
    """
    if download:
        raise DatasetError(f"femnist cannot be downloaded directly; {_FEMNIST_HINT}")
    if not data_dir:
        raise DatasetError(f"femnist needs data.data_dir; {_FEMNIST_HINT}")
    base = Path(data_dir).expanduser()
    root = next((d for d in (base, base / "data") if (d / "train").is_dir() and (d / "test").is_dir()), None)
    if root is None:
        raise DatasetError(
            f"femnist not found: no train/ and test/ folders in {base} or {base / 'data'}; {_FEMNIST_HINT}"
        )

    def split(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        files = sorted((root / folder).glob("*.json"))
        if not files:
            raise DatasetError(f"femnist: {root / folder} holds no .json files; {_FEMNIST_HINT}")
        xs, ys, ids = [], [], []
        for file in files:
            users, user_x, user_y = _read_leaf_json(file)
            xs += user_x
            ys += user_y
            ids += [np.full(len(y), u, dtype=object) for u, y in zip(users, user_y, strict=True)]
        if not xs:
            return np.zeros((0, 784), np.float32), np.zeros(0, np.int64), np.zeros(0, dtype=str)
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids).astype(str)

    x, y, ids = split("train")
    x_test, y_test, test_ids = split("test")
    for what, labels in (("train", y), ("test", y_test)):
        if labels.size and labels.max() >= 62:
            raise DatasetError(f"femnist: {what} labels must lie in [0, 61], found {int(labels.max())}")
    if len(y) == 0:
        raise DatasetError(f"femnist: no training records in {root / 'train'}")
    mean, std = float(x.mean()), float(x.std()) or 1.0

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float().view(-1, 1, 28, 28)

    return DatasetSplits(
        name="femnist",
        train=ArrayDataset(images(x), torch.from_numpy(y)),
        test=ArrayDataset(images(x_test), torch.from_numpy(y_test)),
        num_classes=62,
        train_client_ids=ids,
        test_client_ids=test_ids,
        metadata={"mean": mean, "std": std, "source": str(root)},
    )


register_dataset("synthetic", synthetic)
register_dataset("femnist", load_femnist)
register_dataset("npz", load_npz)
register_dataset("csv", load_csv)
register_dataset("parquet", load_parquet)
register_dataset("file", load_table_file)
