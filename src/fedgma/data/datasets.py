"""Loading a dataset by name: the :data:`fedgma.registry.DATASETS` registry's public face.

Each loader lives in its own module and registers itself with a pydantic model of its options
(:mod:`fedgma.data.idx`: fashion-mnist, mnist; :mod:`fedgma.data.cifar`: cifar10, cifar100;
:mod:`fedgma.data.digits`; :mod:`fedgma.data.colored`: colored-mnist, colored-fashion-mnist;
:mod:`fedgma.data.synthetic`; :mod:`fedgma.data.femnist`; :mod:`fedgma.data.user_files`: npz, csv,
parquet, file). Every loader is called as ``loader(**options, data_dir=..., download=...)``:
``data_dir`` and ``download`` are context every loader receives, not options, and it returns a
:class:`DatasetSplits` of normalised float32 inputs and int64 labels. A missing or corrupt file
is a :class:`DatasetError` that says how to get the data, never a crash deep in torch.
"""

from __future__ import annotations

from typing import Any

from fedgma.data.arrays import DatasetSplits
from fedgma.registry import DATASETS

__all__ = ["DatasetError", "available_datasets", "load_dataset"]


class DatasetError(ValueError):
    """A dataset could not be found, read or validated; the message says how to fix it."""


def available_datasets() -> list[str]:
    """Every registered dataset name, sorted (``DATASETS.names()``)."""
    return DATASETS.names()


def load_dataset(name: str, data_dir: str | None = None, download: bool = False, **options: Any) -> DatasetSplits:
    """Load dataset ``name`` with its loader ``options`` (e.g. Synthetic's α, β), validated first.

    Raises:
        DatasetError: an unknown name, an option the loader does not take or out of its bounds
            (one line naming the dataset, the option and what is allowed), or a file problem.
    """
    try:
        DATASETS.validate(name, options)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    return DATASETS.build(name, options, data_dir=data_dir, download=download)

