"""LEAF FEMNIST (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings"): one client per writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError
from fedgma.data.records import check_features, check_labels
from fedgma.registry import DATASETS, NoOptions

__all__ = ["load_femnist"]

_FEMNIST_HINT = (
    "generate it with LEAF (https://github.com/TalwalkarLab/leaf: in data/femnist run "
    "`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample`) and set data.data_dir to the folder holding "
    "its train/ and test/ directories of .json files"
)


def _read_leaf_json(
    file: Path, seen: dict[str, str] | None = None
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """One LEAF JSON file's users, their inputs float32 [n, 784] and labels int64 [n].

    ``seen`` maps the users read so far (of this split) to their file; a user met again, an empty
    name, a non-finite or absurd pixel (NaN, Infinity, 1e39), a label outside [0, 100,000) or
    counts that disagree are a DatasetError naming the file, the user and the record.
    """
    seen = {} if seen is None else seen
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
        if not isinstance(user, str) or not user.strip():
            raise DatasetError(f"{file}: users must be non-empty names, found {user!r}")
        if user in seen:
            raise DatasetError(f"{file}: user {user!r} appears twice (also in {seen[user]}); LEAF users are unique")
        seen[user] = file.name
        try:
            x = np.asarray(record["x"], dtype=np.float64)
            y = np.asarray(record["y"])
        except (TypeError, ValueError) as error:
            raise DatasetError(f"{file}: user {user!r} has malformed x or y: {error}") from None
        if x.ndim != 2 or x.shape[1] != 784 or len(x) != len(y):
            raise DatasetError(f"{file}: user {user!r} needs x of [n, 784] and n labels, got {x.shape} and {y.shape}")
        if count is not None and count != len(y):
            raise DatasetError(f"{file}: user {user!r} has num_samples {count} but {len(y)} records")
        x = check_features(x, f"{file} user {user!r}")  # NaN, Infinity, 1e39: refused naming the record
        xs.append(x)
        ys.append(check_labels(y, f"{file} user {user!r}", len(x)))
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
        seen: dict[str, str] = {}
        for file in files:
            users, user_x, user_y = _read_leaf_json(file, seen)
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



DATASETS.register("femnist", load_femnist, NoOptions, "LEAF FEMNIST, 62 classes, one client per writer (data_dir)")
