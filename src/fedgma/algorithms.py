"""Recipes: the classic FL algorithms as named defaults for the three independent parts.

A recipe names a client algorithm (``[client.algorithm]``), a server optimizer
(``[server.optimizer]``) with its options, and defaults for local training (``[client]``). It is
only a set of defaults: ``algorithm = "fedavg"`` with ``server.optimizer = "yogi"`` is FedAvg clients
with a Yogi server, and the aggregation rule is never part of a recipe (``server.aggregator =
"gma"`` with ``algorithm = "fedprox"`` is FedProx + GMA). :func:`fedgma.config.resolve` fills
whatever the user left unset from the recipe, and the run folder's ``config.toml`` shows the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = ["RECIPES", "Recipe", "available_algorithms"]


@dataclass(frozen=True)
class Recipe:
    """An FL algorithm as defaults: its client algorithm, its server optimizer, and local-training values."""

    client_algorithm: str  # a name in fedgma.registry.CLIENT_ALGORITHMS
    server_optimizer: str  # a name in fedgma.registry.SERVER_OPTIMIZERS
    server_options: dict[str, Any] = field(default_factory=dict)  # defaults of [server.optimizer]
    client_defaults: dict[str, Any] = field(default_factory=dict)  # defaults of [client] keys
    reference: str = ""


def _recipe(client: str, server: str, server_options: dict[str, Any], prox_mu: float, reference: str) -> Recipe:
    return Recipe(client, server, MappingProxyType(server_options), MappingProxyType({"prox_mu": prox_mu}), reference)


_REDDI = "Reddi et al. 2021, Adaptive Federated Optimization"
RECIPES: dict[str, Recipe] = {
    "fedavg": _recipe(
        "sgd", "sgd", {"lr": 1.0, "momentum": 0.0}, 0.0,
        "McMahan et al. 2017, Communication-Efficient Learning of Deep Networks from Decentralized Data",
    ),
    "fedavgm": _recipe(
        "sgd", "sgd", {"lr": 1.0, "momentum": 0.9}, 0.0,
        "Hsu et al. 2019, Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
    ),
    "fedprox": _recipe(
        "sgd", "sgd", {"lr": 1.0, "momentum": 0.0}, 0.01,
        "Li et al. 2020, Federated Optimization in Heterogeneous Networks",
    ),
    "scaffold": _recipe(
        "scaffold", "sgd", {"lr": 1.0, "momentum": 0.0}, 0.0,
        "Karimireddy et al. 2020, SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
    ),
    "fedadam": _recipe("sgd", "adam", {"lr": 0.01}, 0.0, _REDDI),
    "fedyogi": _recipe("sgd", "yogi", {"lr": 0.01}, 0.0, _REDDI),
    "fedadagrad": _recipe("sgd", "adagrad", {"lr": 0.01}, 0.0, _REDDI),
}


def available_algorithms() -> list[str]:
    """Names of every recipe (``algorithm`` in a config)."""
    return sorted(RECIPES)
