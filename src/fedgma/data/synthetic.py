"""Synthetic(α, β) of Li et al. 2020 (FedProx): generated clients whose models and inputs differ."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.registry import DATASETS, Options

__all__ = ["SyntheticOptions", "synthetic"]


class SyntheticOptions(Options):
    """α, β are standard deviations (≥ 0); ``num_clients`` unset means the run's clients
    (``data.num_clients + data.holdout_clients``), or 30 when loaded on its own."""

    alpha: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    beta: float = Field(1.0, ge=0, le=1e6, allow_inf_nan=False)
    num_clients: int | None = Field(None, ge=1, le=100_000)
    seed: int = Field(0, ge=0)
    iid: bool = False
    test_fraction: float = Field(0.1, ge=0, lt=1)
    num_features: int = Field(60, ge=1, le=100_000)
    num_classes: int = Field(10, ge=1, le=100_000)


def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    num_clients: int | None = None,
    seed: int = 0,
    iid: bool = False,
    test_fraction: float = 0.1,
    num_features: int = 60,
    num_classes: int = 10,
    data_dir: str | None = None,
    download: bool = False,
) -> DatasetSplits:
    """Synthetic(α, β): Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith 2020, "Federated Optimization
    in Heterogeneous Networks" (FedProx), §5.1, following their ``generate_synthetic`` code.

    For client k: u_k ~ N(0, α²), W_k ~ N(u_k, 1) [features × classes], b_k ~ N(u_k, 1);
    B_k ~ N(0, β²), v_k ~ N(B_k, 1) per feature, x ~ N(v_k, Σ) with Σ = diag(j^−1.2);
    y = argmax softmax(W_kᵀx + b_k). α controls how much the local models differ, β how much the
    local inputs differ (as in their code, α and β are standard deviations). Client sizes are
    ⌊lognormal(4, 2)⌋ + 50. ``iid=True`` is their Synthetic-IID: one shared W, b ~ N(0, 1) and
    x ~ N(B_k, Σ) (use β = 0 for identical inputs). Each client's records are shuffled and its last
    ``test_fraction`` (10% in their code) is its test split, so ``test_client_ids`` allows held-out
    per-client evaluation. Deterministic in ``seed``; ``data_dir`` and ``download`` are unused.
    Inputs are float32 [N, num_features], labels int64 in [0, num_classes); options are validated by
    :class:`SyntheticOptions` when loaded by name (``num_clients=None`` gives 30 clients).
    """
    num_clients = 30 if num_clients is None else int(num_clients)
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
    mean_w = rng.normal(0, alpha, num_clients)
    offsets = rng.normal(0, beta, num_clients)
    scale = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt of Σ's diagonal j^-1.2
    if iid:
        w_global = rng.normal(0, 1, (num_features, num_classes))
        b_global = rng.normal(0, 1, num_classes)
    xs, ys, train_mask = [], [], []
    for k in range(num_clients):
        mean_x = np.full(num_features, offsets[k]) if iid else rng.normal(offsets[k], 1, num_features)
        w = w_global if iid else rng.normal(mean_w[k], 1, (num_features, num_classes))
        b = b_global if iid else rng.normal(mean_w[k], 1, num_classes)
        x = mean_x + scale * rng.standard_normal((sizes[k], num_features))
        xs.append(x)
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone: argmax of the logits
        mask = np.zeros(sizes[k], dtype=bool)
        mask[: int((1 - test_fraction) * sizes[k])] = True
        train_mask.append(
            mask
        )  # records are i.i.d. within a client, so the first ones serve as the shuffled train part
    x = np.concatenate(xs).astype(np.float32)
    y = np.concatenate(ys).astype(np.int64)
    owner = np.repeat(np.arange(num_clients), sizes)
    train = np.concatenate(train_mask)
    return DatasetSplits(
        name="synthetic",
        train=ArrayDataset(torch.from_numpy(x[train]), torch.from_numpy(y[train])),
        test=ArrayDataset(torch.from_numpy(x[~train]), torch.from_numpy(y[~train])),
        num_classes=int(num_classes),
        train_client_ids=owner[train],
        test_client_ids=owner[~train],
        metadata={"alpha": float(alpha), "beta": float(beta), "iid": bool(iid), "seed": seed, "sizes": sizes.tolist()},
    )



DATASETS.register("synthetic", synthetic, SyntheticOptions, "Synthetic(α, β) of FedProx, with natural clients")
