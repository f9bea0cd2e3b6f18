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
from fedgma.data.records import MAX_ABS_FEATURE, MAX_CLASSES, assemble, check_allocation, resolve_path
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
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)

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
    num_classes: int | None = Field(None, ge=1, le=MAX_CLASSES)
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
    _check_npz_headers(file)
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


#: Deflate's largest compression ratio is about 1032:1; a member claiming more is forged.
_DEFLATE_MAX_RATIO = 1100


def _check_npz_headers(file: Path) -> None:
    """Check every array's ``.npy`` header in the archive against the bytes it holds, before any is loaded.

    numpy allocates an array from its header's shape before reading the data, so a header claiming
    10^11 rows would allocate terabytes. Each member's header must describe exactly the bytes the
    member holds (shape × item size = member size − header size), a deflated member may not claim
    more than deflate can expand to, and all arrays together must fit in the machine's memory.
    Raises DatasetError naming the file and the array.
    """
    try:
        archive = zipfile.ZipFile(file)
    except (OSError, zipfile.BadZipFile) as error:
        raise DatasetError(f"{file} is not a readable .npz archive (truncated or corrupt?): {error}") from None
    total = 0
    with archive:
        for info in archive.infolist():
            name = info.filename.removesuffix(".npy")
            if info.compress_type == zipfile.ZIP_STORED:
                forged = info.file_size != info.compress_size
            else:
                forged = info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 65536
            if forged:
                raise DatasetError(
                    f"{file}: array {name!r} claims {info.file_size:,} bytes from {info.compress_size:,} stored; "
                    "the archive is corrupt or forged"
                )
            try:
                with archive.open(info) as handle:
                    version = np.lib.format.read_magic(handle)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
                    elif version in ((2, 0), (3, 0)):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
                    else:
                        raise ValueError(f"unsupported .npy format version {version}")
                    header = handle.tell()
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
                raise DatasetError(f"{file}: array {name!r} has no readable .npy header: {error}") from None
            claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
            if claimed != info.file_size - header:
                raise DatasetError(
                    f"{file}: array {name!r}: its header claims shape {shape} of {dtype} ({claimed:,} bytes) but the "
                    f"archive holds {info.file_size - header:,}; the file is corrupt or forged"
                )
            total += claimed
    check_allocation(total, str(file), "its arrays")


# --------------------------------------------------------------------------------------------
# Tables: .csv and Parquet
# --------------------------------------------------------------------------------------------



def _read_csv(file: Path, delimiter: str) -> dict[str, np.ndarray]:
    """The columns of a CSV file with a header row, read by Python's :mod:`csv` module, as text arrays [N].

    A UTF-8 byte-order mark (a spreadsheet's "CSV UTF-8" export), CRLF or LF line ends and quoted
    fields (with delimiters, quotes or line breaks inside) are read as the CSV dialect defines them;
    blank lines, and lines whose fields are all empty, are skipped wherever they are. The physical
    line number of every record is kept in the ``_LINE`` entry for error messages. Raises
    DatasetError naming the file (and line) for an unreadable file, an empty or duplicate header, or
    a record whose field count differs from the header's.
    """
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            body, lines = [], []
            for row in reader:
                if all(not field.strip() for field in row):
                    continue
                if len(row) != len(header):
                    raise DatasetError(
                        f"{file} line {reader.line_num}: {len(row)} fields, the header has {len(header)} "
                        "(a missing delimiter, or a truncated file?)"
                    )
                body.append(row)
                lines.append(reader.line_num)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DatasetError(f"cannot read CSV file {file}: {error}") from None
    if header is None or all(not h.strip() for h in header):
        raise DatasetError(f"{file} is empty: expected a header row and records")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or "" in header:
        raise DatasetError(f"{file}: the header needs distinct, non-empty column names, got {header}")
    table = np.asarray(body, dtype=str).reshape(len(body), len(header))
    return {**{name: table[:, i] for i, name in enumerate(header)}, _LINE: np.asarray(lines, dtype=np.int64)}


#: Key of the line numbers :func:`_read_csv` returns next to the columns (not a column name a header can hold).
_LINE = "\0line"


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


def _parse(values: np.ndarray) -> np.ndarray | None:
    """Text (or objects) [N] parsed as float64 (numpy's parser, as Python's float), or None if some are not numbers."""
    try:
        return values.astype(np.float64)
    except (TypeError, ValueError):
        return None


def _numeric(values: np.ndarray, source: str, column: str, lines: np.ndarray | None = None) -> np.ndarray:
    """A column as numbers: finite, |v| ≤ MAX_ABS_FEATURE, real; DatasetError naming the line (or row) otherwise."""

    def where(row: int) -> str:
        return f"line {lines[row]}" if lines is not None else f"row {row + 1}"

    if values.dtype.kind == "c":
        raise DatasetError(f"{source}: column {column!r} holds complex numbers; give real values")
    if values.dtype.kind in "iub":
        return values
    numbers = values if values.dtype.kind == "f" else _parse(values)
    if numbers is None:
        for row, value in enumerate(values):
            try:
                float(value)
            except (TypeError, ValueError):
                raise DatasetError(
                    f"{source}: column {column!r} {where(row)} is not a number: {str(value)!r}"
                ) from None
        raise DatasetError(f"{source}: column {column!r} is not numeric")
    bad = ~np.isfinite(numbers) | (np.abs(numbers) > MAX_ABS_FEATURE)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{source}: column {column!r} {where(row)} is {str(values[row]).strip()!r}; values must be finite "
            f"numbers within ±{MAX_ABS_FEATURE:g}"
        )
    return numbers


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
    lines, columns = columns.get(_LINE), {k: v for k, v in columns.items() if k != _LINE}
    test_lines = test_columns.get(_LINE) if test_columns is not None else None
    if test_columns is not None:
        test_columns = {k: v for k, v in test_columns.items() if k != _LINE}
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
    if raw_labels.dtype.kind in "USO" and _parse(raw_labels) is None:  # text labels: sorted names to 0 … C−1
        names = [raw_labels] + ([test_columns[label_column]] if test_columns and label_column in test_columns else [])
        classes_array = np.unique(np.char.strip(np.concatenate(names).astype(str)))
        if len(classes_array) > MAX_CLASSES:
            raise DatasetError(
                f"{source}: column {label_column!r} has {len(classes_array)} distinct text labels, more than "
                f"{MAX_CLASSES:,} classes; is it the label column?"
            )
        classes = classes_array.tolist()

    def pick(table: dict[str, np.ndarray], table_source: str, table_lines: np.ndarray | None):
        x = np.stack([_numeric(table[c], table_source, c, table_lines) for c in features], axis=1)
        y = table[label_column]
        if classes is not None:
            y = np.searchsorted(classes, np.char.strip(y.astype(str)))
        elif y.dtype.kind in "USOfc":
            y = _numeric(y, table_source, label_column, table_lines)
        bad = (y < 0) | (y >= MAX_CLASSES) | (y != np.round(y))
        if bad.any():  # named by line here; check_labels would name the record
            row = int(np.flatnonzero(bad)[0])
            where = f"line {table_lines[row]}" if table_lines is not None else f"row {row + 1}"
            raise DatasetError(
                f"{table_source}: column {label_column!r} {where} is {str(table[label_column][row]).strip()!r}; "
                f"labels must be class indices in [0, {MAX_CLASSES:,}) (or text class names)"
            )
        ids = table[client_column] if client_column else None
        return x, y, ids

    x, y, ids = pick(columns, source, lines)
    test = None
    if test_columns is not None:
        missing = [c for c in features + [label_column] if c not in test_columns]
        if missing:
            raise DatasetError(f"test file for {source} lacks column(s) {', '.join(missing)}")
        test = pick(test_columns, f"test file for {source}", test_lines)
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
