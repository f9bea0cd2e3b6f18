"""The federated view of a dataset: one tensor dataset per client, plus the test sets.

``build_federated`` turns a ``[data]`` config section and the run's seed into a
:class:`FederatedDataset`: it loads the dataset, partitions its training records among clients
with the configured partitioner, and records per-client statistics for inspection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedgma.data import partition
from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import load_dataset
from fedgma.seeding import numpy_rng, seed_sequence

__all__ = [
    "FederatedDataset",
    "available_partitions",
    "build_federated",
    "hold_out_validation",
    "register_partition",
]


@dataclass
class FederatedDataset:
    """Client training sets, the global test set, and extra test sets (e.g. held-out domains)."""

    clients: list[ArrayDataset]
    test: ArrayDataset
    num_classes: int
    extra_tests: dict[str, ArrayDataset] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test.x.shape[1:])

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def to(self, device: torch.device | str) -> FederatedDataset:
        return FederatedDataset(
            [c.to(device) for c in self.clients],
            self.test.to(device),
            self.num_classes,
            {k: v.to(device) for k, v in self.extra_tests.items()},
            self.statistics,
        )


Partitioner = Callable[[DatasetSplits, Any, np.random.SeedSequence], list[np.ndarray]]

_PARTITIONS: dict[str, Partitioner] = {
    "iid": lambda splits, cfg, ss: partition.iid(len(splits.train), cfg.num_clients, ss),
    "dirichlet": lambda splits, cfg, ss: partition.dirichlet(
        splits.train.y.numpy(), cfg.num_clients, cfg.alpha, ss, cfg.min_size
    ),
}


def register_partition(name: str, partitioner: Partitioner) -> None:
    """Make a partitioner available by name (``data.partition``)."""
    _PARTITIONS[name] = partitioner


def available_partitions() -> list[str]:
    return sorted(_PARTITIONS)


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """A [clients, classes] array of how many records of each class every client holds."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]) if parts else np.zeros((0, 0))


def build_federated(data: Any, seed: int) -> FederatedDataset:
    """Load ``data.dataset`` and split it among ``data.num_clients`` clients with ``data.partition``."""
    splits = load_dataset(data.dataset, data_dir=data.data_dir, download=data.download)
    parts = _PARTITIONS[data.partition](splits, data, seed_sequence(seed, "partition"))
    counts = label_counts(splits.train.y.numpy(), parts, splits.num_classes)
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"partition {data.partition!r} left {len(empty)} client(s) with no data (e.g. client {empty[0]}); "
            "raise data.min_size or lower data.num_clients"
        )
    return FederatedDataset(
        clients=[splits.train.subset(p) for p in parts],
        test=splits.test,
        num_classes=splits.num_classes,
        statistics={"sizes": [len(p) for p in parts], "label_counts": counts.tolist()},
    )


def hold_out_validation(data: FederatedDataset, fraction: float, seed: int) -> FederatedDataset:
    """Move ``fraction`` of every client's records into one validation set, ``extra_tests["validation"]``.

    Hyper-parameters (e.g. the server learning rate) must be chosen on data drawn like the training
    data, never on the test set. Taking the same fraction from each client, *after* partitioning and
    any per-client feature transform, makes the validation set follow the clients' own mixture of
    labels and domains in every setting (label skew, quantity skew, rotated or coloured domains).
    Each client keeps at least one record. ``fraction = 0`` returns ``data`` unchanged.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return data
    clients, held = [], []
    for client_id, client in enumerate(data.clients):
        order = numpy_rng(seed, "validation", client_id).permutation(len(client))
        cut = min(int(round(fraction * len(client))), len(client) - 1)
        held.append(client.subset(order[:cut]))
        clients.append(client.subset(order[cut:]))
    validation = ArrayDataset(torch.cat([h.x for h in held]), torch.cat([h.y for h in held]))
    statistics = {**data.statistics, "validation_size": len(validation), "sizes": [len(c) for c in clients]}
    return FederatedDataset(
        clients, data.test, data.num_classes, {**data.extra_tests, "validation": validation}, statistics
    )
