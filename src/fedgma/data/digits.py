"""scikit-learn's bundled handwritten digits (8x8, 1,797 images, 10 classes): needs no files."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.registry import DATASETS, Options

__all__ = ["DigitsOptions", "load_digits"]


class DigitsOptions(Options):
    """``test_fraction`` of the images form the test split, chosen by ``seed`` (fixed, not the run's seed)."""

    test_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = Field(0, ge=0)


def load_digits(
    test_fraction: float = 0.25, seed: int = 0, data_dir: str | None = None, download: bool = False
) -> DatasetSplits:
    """The digits as float32 [N, 1, 8, 8] scaled to [-1, 1] and int64 labels in [0, 9].

    The train/test split is a permutation drawn from ``seed``, independent of the run seed, so
    every run sees the same split; ``data_dir`` and ``download`` are unused.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
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


DATASETS.register("digits", load_digits, DigitsOptions, "scikit-learn's 8x8 digits, 1,797 images (no files)")
