"""Backends: how the sampled clients of a round are trained on this machine.

A backend takes the global parameters and the round's client ids and yields one
:class:`~fedgma.client.ClientResult` per client. Every backend replays the same local steps
(``batch_schedule`` seeded from (seed, round, client)), so they agree to float tolerance and the
choice is a matter of speed only:

* ``sequential`` trains one client after another, reusing one model whose parameters and
  gradients are flat vectors: the reference;
* ``vectorized`` (:mod:`fedgma.vectorized`) trains many clients at once as one batched
  computation (options ``max_clients``, ``method``);
* ``multiprocess`` (:mod:`fedgma.multiprocess`) trains clients in parallel worker processes,
  one core each (options ``workers``, ``threads``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from torch import Tensor

from fedgma.client import ClientAlgorithm, ClientResult, LocalSGD, train_client
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel
from fedgma.seeding import torch_generator

__all__ = ["Backend", "SequentialBackend", "available_backends", "make_backend", "register_backend"]


class Backend(Protocol):
    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]: ...

    def close(self) -> None: ...


class SequentialBackend:
    """One client after another on one reused model: the reference every other backend matches."""

    def __init__(self, model: FlatModel, data: FederatedDataset, settings: LocalSGD, seed: int, **_: Any) -> None:
        self.model, self.data, self.settings, self.seed = model, data, settings, seed

    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]:
        for client_id in client_ids:
            yield train_client(
                self.model,
                params,
                self.data.clients[client_id],
                self.settings,
                torch_generator(self.seed, "client", round_index, client_id),
                correction=algorithm.correction(client_id),
                client_id=client_id,
            )

    def close(self) -> None:
        pass


def _vectorized(**kwargs: Any) -> Backend:
    from fedgma.vectorized import VectorizedBackend

    return VectorizedBackend(**kwargs)


def _multiprocess(**kwargs: Any) -> Backend:
    from fedgma.multiprocess import MultiprocessBackend

    return MultiprocessBackend(**kwargs)


_BACKENDS: dict[str, Callable[..., Backend]] = {
    "sequential": SequentialBackend,
    "vectorized": _vectorized,
    "multiprocess": _multiprocess,
}


def register_backend(name: str, factory: Callable[..., Backend]) -> None:
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def make_backend(name: str, model: FlatModel, data: FederatedDataset, settings: LocalSGD, seed: int,
                 **options: Any) -> Backend:
    """Build a backend by name (``backend`` in the config)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    return _BACKENDS[name](model=model, data=data, settings=settings, seed=seed, **options)
