"""In-memory tensor datasets: the one shape every loader returns and every trainer reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["ArrayDataset", "DatasetSplits"]


@dataclass(frozen=True)
class ArrayDataset:
    """Inputs ``x`` (float32, [N, ...]) and integer labels ``y`` (int64, [N]) held as tensors.

    Data stays as whole tensors so training gathers a batch with one index operation and no
    per-sample Python collation.
    """

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"dataset has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")
        if self.y.dim() != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(self.y.shape)}")
        if self.y.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.y.dtype}")
        if not self.x.is_floating_point():
            raise ValueError(f"inputs must be floating point, got {self.x.dtype}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray | Tensor) -> ArrayDataset:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> ArrayDataset:
        return ArrayDataset(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DatasetSplits:
    """A loaded dataset: train and test splits, the number of classes and, for naturally
    partitioned data, the client id of every training record."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    train_client_ids: np.ndarray | None = None
    test_client_ids: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split_name, split in (("train", self.train), ("test", self.test)):
            if len(split) and (int(split.y.min()) < 0 or int(split.y.max()) >= self.num_classes):
                raise ValueError(
                    f"{self.name}: {split_name} labels must lie in [0, {self.num_classes - 1}], "
                    f"found [{int(split.y.min())}, {int(split.y.max())}]"
                )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])
