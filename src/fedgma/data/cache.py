"""Loading a dataset by name through a small in-memory cache of the large fixed image sets.

Tests and sweeps load the same Fashion-MNIST or CIFAR files again and again; the last two such
loads are kept. User files (which may change between loads) and fast generated sets are not.
Everything built from a cached :class:`DatasetSplits` makes new tensors or leaves them untouched.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fedgma.data.arrays import DatasetSplits
from fedgma.data.datasets import load_dataset

__all__ = ["CACHED_DATASETS", "load_cached"]

#: Datasets whose loads are kept (large, read from fixed files).
CACHED_DATASETS = frozenset(
    {"fashion-mnist", "mnist", "cifar10", "cifar100", "colored-mnist", "colored-fashion-mnist"}
)
_CACHE: dict[str, DatasetSplits] = {}
_CACHE_SIZE = 2


def load_cached(name: str, options: Mapping[str, Any], data_dir: str | None, download: bool) -> DatasetSplits:
    """:func:`fedgma.data.datasets.load_dataset` of ``name`` with ``options``, from the cache when it holds it.

    Raises:
        DatasetError: as :func:`~fedgma.data.datasets.load_dataset`.
    """
    key = json.dumps([name, data_dir, download, dict(options)], sort_keys=True, default=str)
    if key in _CACHE:
        return _CACHE[key]
    splits = load_dataset(name, data_dir=data_dir, download=download, **options)
    if name in CACHED_DATASETS:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = splits
    return splits
