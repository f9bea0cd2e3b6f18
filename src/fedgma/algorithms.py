"""Recipes: the classic FL algorithms as named pairs (client algorithm, server optimizer) with defaults.

The aggregation rule is not part of a recipe: ``algorithm = "fedprox"`` with
``server.aggregator = "gma"`` is FedProx + GMA, with no class per combination.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedgma.client import ClientAlgorithm, LocalSGD, PlainClient, ScaffoldClient
from fedgma.server_opt import ServerOptimizer, make_server_optimizer

__all__ = ["RECIPES", "Recipe", "available_algorithms", "make_client_algorithm", "make_server_optimizer_for"]


@dataclass(frozen=True)
class Recipe:
    """An FL algorithm: its client side, its server optimizer, and the defaults of its hyper-parameters."""

    client: str  # "sgd" | "scaffold"
    server_optimizer: str  # "sgd" | "adam" | "yogi" | "adagrad"
    defaults: dict[str, Any] = field(default_factory=dict)
    reference: str = ""


RECIPES: dict[str, Recipe] = {
    "fedavg": Recipe(
        "sgd", "sgd", {"server.lr": 1.0, "server.momentum": 0.0, "client.prox_mu": 0.0},
        "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data",
    ),
    "fedavgm": Recipe(
        "sgd", "sgd", {"server.lr": 1.0, "server.momentum": 0.9, "client.prox_mu": 0.0},
        "Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
    ),
    "fedprox": Recipe(
        "sgd", "sgd", {"server.lr": 1.0, "server.momentum": 0.0, "client.prox_mu": 0.01},
        "Li et al. 2020, Federated Optimization in Heterogeneous Networks",
    ),
    "scaffold": Recipe(
        "scaffold", "sgd", {"server.lr": 1.0, "server.momentum": 0.0, "client.prox_mu": 0.0},
        "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ),
    "fedadam": Recipe(
        "sgd", "adam", {"server.lr": 0.01, "server.momentum": 0.0, "client.prox_mu": 0.0},
        "Reddi et al. 2021, Adaptive Federated Optimization",
    ),
    "fedyogi": Recipe(
        "sgd", "yogi", {"server.lr": 0.01, "server.momentum": 0.0, "client.prox_mu": 0.0},
        "Reddi et al. 2021, Adaptive Federated Optimization",
    ),
    "fedadagrad": Recipe(
        "sgd", "adagrad", {"server.lr": 0.01, "server.momentum": 0.0, "client.prox_mu": 0.0},
        "Reddi et al. 2021, Adaptive Federated Optimization",
    ),
}


def available_algorithms() -> list[str]:
    return sorted(RECIPES)


def make_client_algorithm(
    algorithm: str,
    settings: LocalSGD,
    numel: int,
    num_clients: int,
    device: torch.device | str = "cpu",
    state_memory_mb: int | None = 1024,
) -> ClientAlgorithm:
    """The client side of a recipe, with its state (SCAFFOLD's control variates) initialised.

    ``state_memory_mb`` bounds the RAM of per-client state; beyond it, state spills to disk (None: RAM only).
    """
    recipe = RECIPES[algorithm]
    if recipe.client == "scaffold":
        limit = None if state_memory_mb is None else state_memory_mb * 2**20
        return ScaffoldClient(settings, numel, num_clients, device, memory_limit_bytes=limit)
    return PlainClient(settings)


def make_server_optimizer_for(algorithm: str, server: Any) -> ServerOptimizer:
    """The server optimizer of a recipe, configured from a resolved ``[server]`` section."""
    return make_server_optimizer(
        RECIPES[algorithm].server_optimizer,
        lr=server.lr,
        momentum=server.momentum,
        beta1=server.beta1,
        beta2=server.beta2,
        eps=server.eps,
    )
