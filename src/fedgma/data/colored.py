"""Colored MNIST and Colored Fashion-MNIST (IRM, Arjovsky, Bottou, Gulrajani and Lopez-Paz 2019).

Two loaders build the environments on the grey IDX sets with :func:`fedgma.data.domains.colored_splits`
(one or more clients per training environment, labels binarised with noise, a colour that agrees
with the label with each environment's probability). :func:`colored_tests` gives
:func:`fedgma.data.federated.build_federated` the test sets of such a dataset: the test images
recoloured like the training mixture (in distribution) and the loader's reversed environment as
``ood/env<p>``.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.domains import colored_splits
from fedgma.data.idx import load_idx_dataset
from fedgma.registry import DATASETS, Options
from fedgma.seeding import numpy_rng

__all__ = ["ColoredOptions", "colored_tests", "load_colored"]

Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]


class ColoredOptions(Options):
    """IRM's environments: colour agrees with the label with each ``train_probabilities`` entry on
    training clients and with ``test_probability`` at test; ``label_noise`` flips the binary label;
    ``seed`` fixes the construction (not the run's seed); ``downsample`` shrinks the images by an
    integer factor."""

    train_probabilities: tuple[Probability, ...] = Field((0.9, 0.8), min_length=1)
    test_probability: Probability = 0.1
    label_noise: Probability = 0.25
    seed: int = Field(0, ge=0)
    clients_per_environment: int = Field(1, ge=1)
    downsample: int = Field(1, ge=1)


def load_colored(
    base: str,
    train_probabilities: tuple[float, ...] = (0.9, 0.8),
    test_probability: float = 0.1,
    label_noise: float = 0.25,
    seed: int = 0,
    clients_per_environment: int = 1,
    downsample: int = 1,
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """The Colored environments of grey set ``base`` ("mnist" or "fashion-mnist"): float32 [N, 2, H, W]
    images, int64 labels in {0, 1}, one client id per training environment client."""
    return colored_splits(
        load_idx_dataset(base, data_dir, download),
        tuple(train_probabilities),
        test_probability,
        label_noise,
        seed,
        clients_per_environment=clients_per_environment,
        downsample=downsample,
    )


def _colored_mnist(**options) -> DatasetSplits:
    return load_colored("mnist", **options)


def _colored_fashion_mnist(**options) -> DatasetSplits:
    return load_colored("fashion-mnist", **options)


def _recolour(env: ArrayDataset, probability: float, rng: np.random.Generator) -> ArrayDataset:
    """The same images and (noisy) labels with colours redrawn: colour = label with ``probability``.

    A Colored MNIST image holds its grey strokes in one of two channels and zeros in the other, so
    the channel sum recovers the grey image (:func:`fedgma.data.domains.colored_environments`).
    """
    grey = env.x.sum(dim=1)
    labels = env.y.numpy()
    colour = np.where(rng.random(len(labels)) < probability, labels, 1 - labels)
    x = torch.zeros_like(env.x)
    x[torch.arange(len(labels)), torch.as_tensor(colour)] = grey
    return ArrayDataset(x, env.y.clone())


def colored_tests(splits: DatasetSplits, seed: int) -> tuple[ArrayDataset, dict[str, ArrayDataset], float] | None:
    """For a Colored MNIST dataset: (in-distribution test, {"ood/env<p>": the loader's test env}, p_id).

    None for any other dataset (its metadata lacks the environments). The training environments,
    mixed in proportion to their records, colour each record like the label with probability
    p_id = Σ_e n_e p_e / Σ_e n_e; since an environment differs from another only in that
    probability, recolouring the test images with p_id draws them exactly from the training
    mixture (randomness from ``seed``'s "domains" stream 3). The loader's own test environment
    (IRM's reversed p = 0.1) is the OOD test.
    """
    meta = splits.metadata
    if not {"train_probabilities", "test_probability", "environment_of_client"} <= set(meta):
        return None
    env_of_client = np.asarray(meta["environment_of_client"])
    probabilities = np.asarray(meta["train_probabilities"], dtype=float)
    ids = splits.train_client_ids
    sizes = np.bincount(env_of_client[ids], minlength=len(probabilities)) if ids is not None else None
    weights = sizes if sizes is not None and sizes.sum() else np.ones(len(probabilities))
    p_id = float(np.dot(weights, probabilities) / weights.sum())
    in_distribution = _recolour(splits.test, p_id, numpy_rng(seed, "domains", 3))
    return in_distribution, {f"ood/env{meta['test_probability']:g}": splits.test}, p_id


DATASETS.register("colored-mnist", _colored_mnist, ColoredOptions, "IRM Colored MNIST environments (binary)")
DATASETS.register(
    "colored-fashion-mnist", _colored_fashion_mnist, ColoredOptions, "Colored Fashion-MNIST environments (binary)"
)
