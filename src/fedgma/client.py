"""Client algorithms: what a sampled client does with the global model and its own data.

Every classic algorithm here is local SGD on the client's loss with a gradient correction:

    g = ∇f_i(w; batch) + λ w  [weight decay]  + μ (w − w_global)  [FedProx]  + (c − c_i)  [SCAFFOLD]

so one local-SGD core (``train_client``) serves them all, and a vectorised backend needs to
implement only that core. What differs between algorithms is the state around it, which lives
in small objects (``PlainClient``, ``ScaffoldClient``) with ``state_dict()``/``load_state_dict()``.

The batch order of a client in a round comes from ``batch_schedule`` with a generator seeded from
(seed, round, client), so every backend replays exactly the same local steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import Field
from torch import Tensor

from fedgma.control_store import ControlVariateStore
from fedgma.data.arrays import ArrayDataset
from fedgma.models import FlatModel
from fedgma.registry import CLIENT_ALGORITHMS, NoOptions, Options

__all__ = [
    "ClientAlgorithm",
    "ClientResult",
    "ControlVariateStore",
    "LocalSGD",
    "PlainClient",
    "ScaffoldClient",
    "BatchSchedule",
    "batch_schedule",
    "make_client_algorithm",
    "train_client",
]


@dataclass(frozen=True)
class LocalSGD:
    """Local training settings: ``epochs`` passes over the data, or exactly ``steps`` steps when set."""

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            ("client.local_epochs", self.epochs >= 1 or self.steps is not None, "≥ 1"),
            ("client.local_steps", self.steps is None or self.steps >= 1, "≥ 1"),
            ("client.batch_size", self.batch_size >= 1, "≥ 1"),
            ("client.lr", 0 < self.lr <= 1e3, "a finite number in (0, 1000]"),
            ("client.momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("client.weight_decay", 0 <= self.weight_decay <= 1e3, "a finite number in [0, 1000]"),
            ("client.prox_mu", 0 <= self.prox_mu <= 1e3, "a finite number in [0, 1000]"),
        ]
        for key, ok, expected in checks:
            if not ok:  # NaN fails every comparison, so it is refused too
                raise ValueError(f"{key} must be {expected}")

    def num_steps(self, num_samples: int) -> int:
        """How many local steps ``batch_schedule`` gives a client of ``num_samples`` records."""
        return self.steps or self.epochs * math.ceil(num_samples / self.batch_size)


@dataclass
class ClientResult:
    """What one client sends back: its update Δ = θ_local − θ_global and how it was made."""

    client_id: int
    update: Tensor
    num_samples: int
    num_steps: int
    train_loss: float
    control_delta: Tensor | None = None


class BatchSchedule:
    """The index batches of one client's local training, made lazily: O(num_samples) memory at most.

    Iterating yields int64 index tensors (each of ``batch_size`` indices into the client's records,
    the last of an epoch possibly shorter), one epoch's permutation at a time, so memory does not
    depend on the number of epochs or steps. Every iteration replays the same batches: the
    generator's state is copied when the schedule is made (the caller's generator is not advanced).
    ``len()`` is the number of local steps, ``settings.num_steps(num_samples)``.
    """

    def __init__(self, num_samples: int, settings: LocalSGD, generator: torch.Generator) -> None:
        if num_samples < 1:
            raise ValueError("a client with no samples cannot train")
        self.num_samples = num_samples
        self.batch_size = settings.batch_size
        self.steps = settings.num_steps(num_samples)
        self._device = generator.device
        self._state = generator.get_state()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Tensor]:
        generator = torch.Generator(device=self._device)
        generator.set_state(self._state)
        left = self.steps
        while left > 0:
            order = torch.randperm(self.num_samples, generator=generator)
            for batch in order.split(self.batch_size):
                yield batch
                left -= 1
                if left == 0:
                    return


def batch_schedule(num_samples: int, settings: LocalSGD, generator: torch.Generator) -> BatchSchedule:
    """Index batches of one client's local training: reshuffle each epoch, keep the last short batch.

    With ``settings.steps`` set, epochs repeat until exactly that many steps are scheduled. Returns a
    lazy :class:`BatchSchedule` (``len()`` and repeatable iteration; memory independent of epochs/steps).

    Raises:
        ValueError: ``num_samples`` < 1.
    """
    return BatchSchedule(num_samples, settings, generator)


def train_client(
    model: FlatModel,
    global_params: Tensor,
    data: ArrayDataset,
    settings: LocalSGD,
    generator: torch.Generator,
    correction: Tensor | None = None,
    client_id: int = -1,
) -> ClientResult:
    """Run local SGD from ``global_params`` on ``data``; return Δ = θ_local − θ_global.

    ``correction`` is a constant added to every gradient (SCAFFOLD's c − c_i); FedProx's proximal
    gradient μ (w − w_global) and weight decay come from ``settings``. The step matches
    ``torch.optim.SGD`` (weight decay added before momentum, no dampening).
    """
    model.load(global_params)
    params, grads = model.params, model.grads
    velocity = torch.zeros_like(params) if settings.momentum > 0 else None
    batches = batch_schedule(len(data), settings, generator)
    loss_sum = torch.zeros((), device=params.device)
    for batch in batches:
        if batch.device != data.x.device:
            batch = batch.to(data.x.device)
        loss_sum += model.loss_and_backward(data.x[batch], data.y[batch])  # sets grads
        with torch.no_grad():
            if settings.weight_decay:
                grads.add_(params, alpha=settings.weight_decay)
            if settings.prox_mu:
                grads.add_(params - global_params, alpha=settings.prox_mu)
            if correction is not None:
                grads.add_(correction)
            step = grads
            if velocity is not None:
                velocity.mul_(settings.momentum).add_(grads)
                step = velocity
            params.sub_(step, alpha=settings.lr)
    return ClientResult(
        client_id=client_id,
        update=params - global_params,
        num_samples=len(data),
        num_steps=len(batches),
        train_loss=float(loss_sum) / len(batches),
    )


# --------------------------------------------------------------------------------------------
# Client algorithms: the state around local SGD
# --------------------------------------------------------------------------------------------


class ClientAlgorithm(Protocol):
    """Per-round hooks around local SGD, and the algorithm's saved state.

    A round is a transaction: ``begin_round``, then ``finish_client`` for every accepted reply
    (which may only *stage* state changes), then either ``end_round`` (commit every staged change)
    or ``abort_round`` (discard them: the state is bit-identical to before ``begin_round``).
    """

    name: str
    settings: LocalSGD

    def begin_round(self, global_params: Tensor) -> None: ...

    def correction(self, client_id: int) -> Tensor | None: ...

    def finish_client(self, result: ClientResult) -> None: ...

    def end_round(self, results: Sequence[ClientResult]) -> dict[str, float]: ...

    def abort_round(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class PlainClient:
    """Local SGD (FedAvg, McMahan et al. 2017) or, with ``prox_mu`` > 0, FedProx (Li et al. 2020)."""

    def __init__(self, settings: LocalSGD) -> None:
        self.settings = settings
        self.name = "fedprox" if settings.prox_mu > 0 else "sgd"

    def begin_round(self, global_params: Tensor) -> None:
        pass

    def correction(self, client_id: int) -> Tensor | None:
        return None

    def finish_client(self, result: ClientResult) -> None:
        pass

    def end_round(self, results: Sequence[ClientResult]) -> dict[str, float]:
        return {}

    def abort_round(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ScaffoldClient:
    """SCAFFOLD (Karimireddy et al. 2020) with option II control variates.

    Client i corrects each gradient by c − c_i, then sets c_i⁺ = c_i − c + (θ − y_i)/(K η_l)
    = c_i − c − Δ_i/(K η_l), K its number of local steps. The server sets
    c ← c + (1/N) Σ_{i ∈ S} (c_i⁺ − c_i) over every sampled client, N the population size.
    Control variates are always averaged plainly: the aggregation rule (e.g. GMA's mask) applies
    to the model update only.
    """

    name = "scaffold"

    def __init__(
        self,
        settings: LocalSGD,
        numel: int,
        num_clients: int,
        device: torch.device | str = "cpu",
        memory_limit_bytes: int | None = ControlVariateStore.DEFAULT_MEMORY_LIMIT,
        spill_dir: str | None = None,
    ) -> None:
        if settings.momentum or settings.prox_mu:
            raise ValueError("scaffold: option II control variates assume plain local SGD (momentum = prox_mu = 0)")
        self.settings = settings
        self.num_clients = num_clients
        self.server_control = torch.zeros(numel, device=device)
        self.store = ControlVariateStore(numel, device, memory_limit_bytes=memory_limit_bytes, spill_dir=spill_dir)
        self._delta_sum: Tensor | None = None
        self._staged: dict[int, Tensor] = {}  # client id -> its new c_i, written when the round commits

    def begin_round(self, global_params: Tensor) -> None:
        self._delta_sum = torch.zeros_like(self.server_control)
        self._staged = {}

    def correction(self, client_id: int) -> Tensor:
        return self.server_control - self.store.get(client_id)

    def finish_client(self, result: ClientResult) -> None:
        """Stage the client's new c_i (kept until ``end_round``; K staged vectors of d floats at most)."""
        if self._delta_sum is None:
            raise RuntimeError("scaffold: finish_client called outside a round (call begin_round first)")
        control_delta = -self.server_control - result.update / (result.num_steps * self.settings.lr)
        self._staged[result.client_id] = self.store.get(result.client_id) + control_delta
        self._delta_sum += control_delta
        result.control_delta = control_delta

    def end_round(self, results: Sequence[ClientResult]) -> dict[str, float]:
        """Commit the round: write every staged c_i and move the server's c by their mean change."""
        if self._delta_sum is None:
            raise RuntimeError("scaffold: end_round called outside a round (call begin_round first)")
        for client_id, value in self._staged.items():
            self.store.set(client_id, value)
        self.server_control += self._delta_sum / self.num_clients
        self._delta_sum, self._staged = None, {}
        return {"server_control_norm": float(self.server_control.norm())}

    def abort_round(self) -> None:
        """Discard the round: no c_i and not c change (a round skipped for too few replies)."""
        self._delta_sum, self._staged = None, {}

    def state_dict(self) -> dict[str, Any]:
        return {"server_control": self.server_control.cpu().clone(), "store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.server_control = state["server_control"].to(self.server_control.device).clone()
        self.store.load_state_dict(state["store"])


def mean_train_loss(results: Iterable[ClientResult]) -> float:
    """Local training loss averaged over every local step of the round."""
    results = list(results)
    steps = sum(r.num_steps for r in results)
    return sum(r.train_loss * r.num_steps for r in results) / max(steps, 1)


class ScaffoldOptions(Options):
    """Options of the ``scaffold`` client algorithm (``[client.algorithm]``)."""

    memory_mb: int = Field(1024, ge=0, le=2**30, description="RAM for the c_i before they spill to disk (MiB)")


def _make_plain(settings: LocalSGD, **_: Any) -> PlainClient:
    return PlainClient(settings)


def _make_scaffold(
    settings: LocalSGD, numel: int, num_clients: int, device: torch.device | str = "cpu",
    memory_mb: int = 1024, spill_dir: str | None = None,
) -> ScaffoldClient:
    return ScaffoldClient(settings, numel, num_clients, device, memory_limit_bytes=memory_mb * 2**20,
                          spill_dir=spill_dir)


CLIENT_ALGORITHMS.register("sgd", _make_plain, NoOptions, "local SGD: FedAvg (and FedProx with client.prox_mu > 0)")
CLIENT_ALGORITHMS.register("scaffold", _make_scaffold, ScaffoldOptions, "SCAFFOLD, option II control variates")


def make_client_algorithm(name: str, settings: LocalSGD, options: dict[str, Any] | None = None,
                          **context: Any) -> ClientAlgorithm:
    """Build a client algorithm by name (``[client.algorithm]``) with its own options.

    ``context`` carries what is not configuration: ``numel`` (parameters of the model),
    ``num_clients`` (population size N), ``device`` and ``spill_dir`` (where SCAFFOLD's c_i spill).

    Raises:
        ValueError: unknown algorithm, an option it does not take, or a value out of range.
    """
    return CLIENT_ALGORITHMS.build(name, options, settings=settings, **context)
