"""User data files: NumPy ``.npz`` archives, CSV tables and Parquet tables, and ``file`` (by extension).

A file may carry a client id per record (array ``client_id``, or a client column), which gives the
natural partition (``data.partition = "natural"``); without one the records are partitioned like
any other set. Without a separate test set (``x_test``/``y_test``, or ``test_path``),
``test_fraction`` of the records (of each client) are held out, chosen by ``seed`` (fixed, not the
run's seed). Inputs come out float32 [N, features...], labels int64 in [0, num_classes). Every file
is checked before use (:mod:`fedgma.data.records`); a problem is a :class:`DatasetError` naming it.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from fedgma.data.arrays import DatasetSplits
from fedgma.data.datasets import DatasetError
from fedgma.data.records import assemble, resolve_path
from fedgma.registry import DATASETS, Options

__all__ = [
    "CsvOptions", "FileOptions", "NpzOptions", "ParquetOptions", "load_csv", "load_npz", "load_parquet",
    "load_table_file",
]


def _required_path(value: str | None) -> str:
    if value is None or not str(value).strip():
        raise ValueError("the file to load must be given, e.g. path = 'data/clients.csv'")
    return value


class NpzOptions(Options):
    """``path`` (relative to ``data.data_dir`` when set); the held-out ``test_fraction`` and its ``seed``;
    ``num_classes`` (unset: the largest label + 1)."""

    path: str | None = Field(None, validate_default=True)
    test_fraction: float = Field(0.2, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    num_classes: int | None = Field(None, ge=1)

    _path = field_validator("path")(_required_path)


class ParquetOptions(NpzOptions):
    """As :class:`NpzOptions`, plus the columns: ``label_column``, ``client_column`` (unset: ``client_id``
    when present), ``feature_columns`` (unset: every other column) and a separate ``test_path``."""

    label_column: str = "label"
    client_column: str | None = None
    feature_columns: list[str] | None = Field(None, min_length=1)
    test_path: str | None = None


class CsvOptions(ParquetOptions):
    """As :class:`ParquetOptions`, plus the one-character field ``delimiter``."""

    delimiter: str = Field(",", min_length=1, max_length=1)


class FileOptions(Options):
    """``path`` and any option of the format its extension names; unset options take that format's defaults."""

    path: str | None = Field(None, validate_default=True)
    test_fraction: float | None = Field(None, ge=0, lt=1)
    seed: int | None = Field(None, ge=0)
    num_classes: int | None = Field(None, ge=1)
    label_column: str | None = None
    client_column: str | None = None
    feature_columns: list[str] | None = Field(None, min_length=1)
    test_path: str | None = None
    delimiter: str | None = Field(None, min_length=1, max_length=1)

    _path = field_validator("path")(_required_path)


# --------------------------------------------------------------------------------------------
# .npz
# --------------------------------------------------------------------------------------------


def load_npz(
    path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """A NumPy ``.npz`` archive: arrays ``x`` [N, ...] and ``y`` [N], optionally ``client_id`` [N],
    and optionally a test set ``x_test``, ``y_test`` (and ``client_id_test``); without one,
    ``test_fraction`` of the records (per client) are held out, chosen by ``seed``.
    Object arrays are refused (``allow_pickle=False``).
    """
    file = resolve_path(path, data_dir, "npz")
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
    return assemble(
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
    return assemble(name, source, x, y, ids, test, test_fraction, seed, num_classes, metadata)



def load_csv(
    path: str | None = None,
    label_column: str = "label",
    client_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    delimiter: str = ",",
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """A CSV table with a header: feature columns, a label column and optionally a client id column.

    Features are every column but the label and client columns unless ``feature_columns`` names
    them. ``client_column`` defaults to ``client_id`` when such a column exists. Integer labels are
    used as they are; text labels are mapped to 0 … C−1 in sorted order (``metadata["classes"]``).
    ``test_path`` names a test table with the same columns; without it ``test_fraction`` of the
    records (per client) are held out, chosen by ``seed``.
    """
    file = resolve_path(path, data_dir, "csv")
    test = _read_csv(resolve_path(test_path, data_dir, "csv test_path"), delimiter) if test_path else None
    return _table_splits(
        _read_csv(file, delimiter), str(file), file.stem, label_column, client_column, feature_columns, test,
        test_fraction, seed, num_classes,
    )


def load_parquet(
    path: str | None = None,
    label_column: str = "label",
    client_column: str | None = None,
    feature_columns: Sequence[str] | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    num_classes: int | None = None,
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """A Parquet table, with the same columns and options as :func:`load_csv` (needs pyarrow)."""
    file = resolve_path(path, data_dir, "parquet")
    test = _read_parquet(resolve_path(test_path, data_dir, "parquet test_path")) if test_path else None
    return _table_splits(
        _read_parquet(file), str(file), file.stem, label_column, client_column, feature_columns, test,
        test_fraction, seed, num_classes,
    )


_BY_SUFFIX: dict[str, tuple[Any, type[Options]]] = {
    ".npz": (load_npz, NpzOptions),
    ".csv": (load_csv, CsvOptions),
    ".tsv": (load_csv, CsvOptions),
    ".parquet": (load_parquet, ParquetOptions),
    ".pq": (load_parquet, ParquetOptions),
}


def load_table_file(
    path: str | None = None, data_dir: str | None = None, download: bool = False, **options: Any
) -> DatasetSplits:
    """Load a user file by its extension: ``.npz``, ``.csv`` (or ``.tsv``, tab-delimited) or ``.parquet``.

    ``options`` set to None take the format's defaults; a set option the format does not take is a
    :class:`DatasetError` naming the options it does take.
    """
    file = resolve_path(path, data_dir, "file")
    suffix = file.suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise DatasetError(f"{file}: unknown file type {suffix!r}; use .npz, .csv, .tsv or .parquet")
    loader, model = _BY_SUFFIX[suffix]
    given = {k: v for k, v in options.items() if v is not None}
    accepted = sorted(set(model.model_fields) - {"path"})
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise DatasetError(f"{file}: {suffix} files do not take option(s) {', '.join(unknown)}; they take {accepted}")
    if suffix == ".tsv":
        given.setdefault("delimiter", "\t")
    return loader(path=str(file), data_dir=data_dir, download=download, **given)


DATASETS.register("npz", load_npz, NpzOptions, "a NumPy .npz archive of x, y (and client_id, x_test, y_test)")
DATASETS.register("csv", load_csv, CsvOptions, "a CSV table: feature, label and client id columns")
DATASETS.register("parquet", load_parquet, ParquetOptions, "a Parquet table (needs pyarrow)")
DATASETS.register("file", load_table_file, FileOptions, "a user file, by its extension (.npz, .csv, .tsv, .parquet)")
