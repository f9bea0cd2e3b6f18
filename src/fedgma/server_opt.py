"""Server optimizers: apply the aggregated update to the global model.

The server sees the aggregated client update u (for GMA, m ⊙ Δ) as a pseudo-gradient
g = −u ("old minus new", the convention of FedJAX, FLSim and pfl), so ``ServerSGD(lr=1)`` is
exactly FedAvg: θ ← θ − 1·g = θ + u. Adaptive optimizers follow Reddi et al. 2021, "Adaptive
Federated Optimization" (ICLR), Algorithm 2: no bias correction, v initialised to τ², and the
adaptivity constant τ (here ``eps``) added to √v.

Each optimizer is a small object with ``step(params, pseudo_grad) -> new params`` and
``state_dict()`` / ``load_state_dict()`` in the style of torch.optim, so a run can be resumed.

A step is transactional: the new moments are computed into new tensors and kept only if the new
parameters are all finite. A step that returns non-finite parameters (which
:func:`fedgma.round.run_round` refuses, raising ``FloatingPointError``) leaves the optimizer's state
bit-identical, so the round changes nothing.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from pydantic import Field
from torch import Tensor

from fedgma.registry import SERVER_OPTIMIZERS, Options

__all__ = [
    "ServerAdagrad",
    "ServerAdam",
    "ServerOptimizer",
    "ServerSGD",
    "ServerYogi",
    "available_server_optimizers",
    "make_server_optimizer",
]


class ServerOptimizer(Protocol):
    def step(self, params: Tensor, pseudo_grad: Tensor) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "≥ 0" if allow_zero else "> 0"
        raise ValueError(f"server optimizer: {name} must be a finite number {bound}, got {value!r}")
    return v


def _unit(name: str, value: float) -> float:
    v = float(value)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"server optimizer: {name} must lie in [0, 1), got {value!r}")
    return v


def _finite(tensor: Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


def _check_shapes(params: Tensor, pseudo_grad: Tensor) -> None:
    if params.shape != pseudo_grad.shape:
        raise ValueError(
            f"server optimizer: pseudo-gradient shape {tuple(pseudo_grad.shape)} "
            f"does not match parameter shape {tuple(params.shape)}"
        )


class ServerSGD:
    """θ ← θ − η_g · v with heavy-ball momentum v ← β v + g (β = 0: FedAvg; β > 0: FedAvgM).

    FedAvgM: Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution".
    """

    name = "sgd"

    def __init__(self, lr: float = 1.0, momentum: float = 0.0) -> None:
        self.lr = _positive("lr", lr)
        self.momentum = _unit("momentum", momentum)
        self.velocity: Tensor | None = None

    def step(self, params: Tensor, pseudo_grad: Tensor) -> Tensor:
        """The new parameters [d]; the velocity is updated only if they are all finite."""
        _check_shapes(params, pseudo_grad)
        direction = pseudo_grad
        if self.momentum > 0:
            if self.velocity is None:
                direction = pseudo_grad.clone()
            else:
                direction = self.velocity.mul(self.momentum).add_(pseudo_grad)
        new_params = params - self.lr * direction
        if self.momentum > 0 and _finite(new_params):
            self.velocity = direction
        return new_params

    def state_dict(self) -> dict[str, Any]:
        return {"velocity": None if self.velocity is None else self.velocity.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        velocity = state.get("velocity")
        self.velocity = None if velocity is None else velocity.clone()


class _Adaptive:
    """Shared moments of FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2)."""

    name = "adaptive"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3) -> None:
        self.lr = _positive("lr", lr)
        self.beta1 = _unit("beta1", beta1)
        self.beta2 = _unit("beta2", beta2)
        self.eps = _positive("eps", eps)
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def _second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        """The new second moment from ``v`` (not modified) and g²."""
        raise NotImplementedError

    def step(self, params: Tensor, pseudo_grad: Tensor) -> Tensor:
        """The new parameters [d]; m and v are updated only if they are all finite."""
        _check_shapes(params, pseudo_grad)
        m = torch.zeros_like(pseudo_grad) if self.m is None else self.m
        v = torch.full_like(pseudo_grad, self.eps**2) if self.v is None else self.v
        m = m.mul(self.beta1).add_(pseudo_grad, alpha=1 - self.beta1)
        v = self._second_moment(v, pseudo_grad * pseudo_grad)
        new_params = params - self.lr * m / (v.sqrt() + self.eps)
        if _finite(new_params):
            self.m, self.v = m, v
        return new_params

    def state_dict(self) -> dict[str, Any]:
        return {
            "m": None if self.m is None else self.m.clone(),
            "v": None if self.v is None else self.v.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = None if state.get("m") is None else state["m"].clone()
        self.v = None if state.get("v") is None else state["v"].clone()


class ServerAdam(_Adaptive):
    """FedAdam: v ← β₂ v + (1 − β₂) g²."""

    name = "adam"

    def _second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v.mul(self.beta2).add_(g2, alpha=1 - self.beta2)


class ServerYogi(_Adaptive):
    """FedYogi: v ← v − (1 − β₂) g² sign(v − g²) (Zaheer et al. 2018's Yogi, server-side)."""

    name = "yogi"

    def _second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v - (1 - self.beta2) * g2 * torch.sign(v - g2)


class ServerAdagrad(_Adaptive):
    """FedAdagrad: v ← v + g² (β₂ unused)."""

    name = "adagrad"

    def _second_moment(self, v: Tensor, g2: Tensor) -> Tensor:
        return v + g2


class SGDOptions(Options):
    """Options of the ``sgd`` server optimizer (FedAvg with momentum 0, FedAvgM with momentum > 0)."""

    lr: float = Field(1.0, gt=0, le=1e3, allow_inf_nan=False, description="server learning rate η_g")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum β (FedAvgM, Hsu et al. 2019)")


class AdagradOptions(Options):
    """Options of ``adagrad`` (Reddi et al. 2021, Algorithm 2: v ← v + g², so no β2)."""

    lr: float = Field(0.01, gt=0, le=1e3, allow_inf_nan=False, description="server learning rate η")
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β1")
    eps: float = Field(1e-3, gt=0, le=1e3, allow_inf_nan=False, description="adaptivity τ; v starts at τ²")


class AdaptiveOptions(AdagradOptions):
    """Options of ``adam`` and ``yogi`` (Reddi et al. 2021, Algorithm 2)."""

    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay β2")


SERVER_OPTIMIZERS.register("sgd", ServerSGD, SGDOptions, "SGD with optional momentum: FedAvg, FedAvgM")
SERVER_OPTIMIZERS.register("adam", ServerAdam, AdaptiveOptions, "FedAdam (Reddi et al. 2021)")
SERVER_OPTIMIZERS.register("yogi", ServerYogi, AdaptiveOptions, "FedYogi (Reddi et al. 2021)")
SERVER_OPTIMIZERS.register("adagrad", ServerAdagrad, AdagradOptions, "FedAdagrad (Reddi et al. 2021)")


def available_server_optimizers() -> list[str]:
    """Names of every registered server optimizer."""
    return SERVER_OPTIMIZERS.names()


def make_server_optimizer(name: str, **options: Any) -> ServerOptimizer:
    """Build a server optimizer by name with its own options (``[server.optimizer]``).

    Raises:
        ValueError: unknown optimizer, an option it does not take (e.g. ``momentum`` for ``adam``),
            or a value out of range; the message names the optimizer and the option.
    """
    return SERVER_OPTIMIZERS.build(name, options)
