"""The partitioners a config can name (``data.partition``), registered in :data:`fedgma.registry.PARTITIONERS`.

Each entry is a factory taking the partitioner's validated options and returning a
:class:`Partitioner`: a function ``(splits, num_clients, seed) -> parts`` that splits the training
records of a :class:`DatasetSplits` among ``num_clients`` clients, drawing every random choice from
the :class:`numpy.random.SeedSequence` ``seed``, and returns one sorted int64 index array per
client. The maths lives in :mod:`fedgma.data.partition` (names after NIID-Bench, Li et al. 2022);
this module only binds options to it.

| name | options | what |
|---|---|---|
| iid | none | random near-equal parts |
| dirichlet | alpha > 0, min_size ≥ 0 | label skew by Dirichlet(α) |
| shards | classes_per_client ≥ 1 | each client holds exactly k classes |
| quantity | exactly one of beta > 0 or sigma > 0, min_size ≥ 0 | unequal client sizes, IID labels |
| quantity-label | alpha > 0, exactly one of beta or sigma, min_size ≥ 0 | both skews together |
| natural | none | the dataset's own client ids |
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import Field, ValidationInfo, field_validator

from fedgma.data import partition
from fedgma.data.arrays import DatasetSplits
from fedgma.registry import PARTITIONERS, NoOptions, Options

__all__ = [
    "DirichletOptions", "Partitioner", "QuantityLabelOptions", "QuantityOptions", "ShardsOptions",
    "available_partitions",
]

#: (loaded splits, number of clients, seed) -> one sorted int64 index array per client.
Partitioner = Callable[[DatasetSplits, int, np.random.SeedSequence], list[np.ndarray]]


def available_partitions() -> list[str]:
    """Every registered partitioner name, sorted (``PARTITIONERS.names()``)."""
    return PARTITIONERS.names()


def _labels(splits: DatasetSplits) -> np.ndarray:
    return splits.train.y.numpy()


class DirichletOptions(Options):
    """Dirichlet(α) label skew; clients below ``min_size`` records are topped up from the largest."""

    alpha: float = Field(0.5, gt=0, allow_inf_nan=False)
    min_size: int = Field(10, ge=0)


class ShardsOptions(Options):
    """Every client holds exactly ``classes_per_client`` classes (NIID-Bench ``#label k``)."""

    classes_per_client: int = Field(2, ge=1)


class QuantityOptions(Options):
    """Client sizes from Dirichlet(β) shares (NIID-Bench) or log-normal(0, σ): exactly one of the two."""

    beta: float | None = Field(None, gt=0, allow_inf_nan=False)
    sigma: float | None = Field(None, gt=0, allow_inf_nan=False, validate_default=True)
    min_size: int = Field(10, ge=0)

    @field_validator("sigma")
    @classmethod
    def _exactly_one(cls, sigma: float | None, info: ValidationInfo) -> float | None:
        if "beta" in info.data and (info.data["beta"] is None) == (sigma is None):
            raise ValueError(
                "give exactly one of beta (Dirichlet(β) client shares, NIID-Bench) or sigma (log-normal(0, σ) "
                f"client sizes); got beta={info.data['beta']!r}, sigma={sigma!r}"
            )
        return sigma


class QuantityLabelOptions(QuantityOptions):
    """Quantity skew (beta or sigma) and Dirichlet(α) label skew together (NIID-Bench's mixed skew)."""

    alpha: float = Field(0.5, gt=0, allow_inf_nan=False)


def _iid() -> Partitioner:
    return lambda splits, n, seed: partition.iid(len(splits.train), n, seed)


def _dirichlet(alpha: float, min_size: int) -> Partitioner:
    return lambda splits, n, seed: partition.dirichlet(_labels(splits), n, alpha, seed, min_size)


def _shards(classes_per_client: int) -> Partitioner:
    return lambda splits, n, seed: partition.shards(_labels(splits), n, classes_per_client, seed)


def _quantity(beta: float | None, sigma: float | None, min_size: int) -> Partitioner:
    return lambda splits, n, seed: partition.quantity(
        len(splits.train), n, seed, min_size=min_size, beta=beta, sigma=sigma
    )


def _quantity_label(alpha: float, beta: float | None, sigma: float | None, min_size: int) -> Partitioner:
    return lambda splits, n, seed: partition.quantity_label_skew(
        _labels(splits), n, alpha, seed, min_size=min_size, beta=beta, sigma=sigma
    )


def _natural_parts(splits: DatasetSplits, n: int, seed: np.random.SeedSequence) -> list[np.ndarray]:
    """One client per distinct client id of the records; ``n`` must equal their number."""
    if splits.train_client_ids is None:
        raise ValueError(
            f"config key 'data.partition': 'natural' needs a dataset with client ids (synthetic, femnist, "
            f"colored-*, or a user file with a client column); dataset {splits.name!r} has none"
        )
    parts, _ = partition.natural(splits.train_client_ids)
    if len(parts) != n:
        raise NaturalClientCountError(splits.name, len(parts), n)
    return parts


class NaturalClientCountError(ValueError):
    """The dataset has ``found`` natural clients but the run asks for ``expected``."""

    def __init__(self, dataset: str, found: int, expected: int) -> None:
        self.dataset, self.found, self.expected = dataset, found, expected
        super().__init__(f"dataset {dataset!r} has {found} natural clients, but the run asks for {expected}")


def _natural() -> Partitioner:
    return _natural_parts


PARTITIONERS.register("iid", _iid, NoOptions, "random near-equal parts (NIID-Bench homo)")
PARTITIONERS.register("dirichlet", _dirichlet, DirichletOptions, "label skew by Dirichlet(alpha)")
PARTITIONERS.register("shards", _shards, ShardsOptions, "each client holds exactly classes_per_client classes")
PARTITIONERS.register("quantity", _quantity, QuantityOptions, "unequal client sizes (beta or sigma), IID labels")
PARTITIONERS.register(
    "quantity-label", _quantity_label, QuantityLabelOptions, "quantity skew and Dirichlet(alpha) label skew"
)
PARTITIONERS.register("natural", _natural, NoOptions, "the dataset's own client ids")
