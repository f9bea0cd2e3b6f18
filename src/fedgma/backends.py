"""Backends: how the sampled clients of a round are trained on this machine.

A backend takes the global parameters and the round's client ids and yields one
:class:`~fedgma.client.ClientResult` per client, in the order of the ids. Every backend replays the
same local steps (``batch_schedule`` seeded from (seed, round, client)), so they agree to float
tolerance and the choice is a matter of speed only:

* ``sequential`` trains one client after another, reusing one model whose parameters and
  gradients are flat vectors: the reference;
* ``multiprocess`` (:mod:`fedgma.multiprocess`) trains clients in parallel worker processes,
  one core each (options ``workers``, ``threads``, ``start_method``): the fast path on a CPU;
* ``vectorized`` (:mod:`fedgma.vectorized`) trains many clients at once with
  ``torch.func.vmap`` (option ``max_clients``): meant for a GPU, no faster than sequential on a CPU.

Backends are registered in :data:`fedgma.registry.BACKENDS` with a pydantic model of their options
(config table ``[backend]``); :func:`make_backend` and :func:`available_backends` are thin wrappers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal, Protocol

from pydantic import Field
from torch import Tensor

from fedgma.client import ClientAlgorithm, ClientResult, LocalSGD, train_client
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel
from fedgma.registry import BACKENDS, NoOptions, Options
from fedgma.seeding import torch_generator

__all__ = [
    "Backend", "MultiprocessOptions", "SequentialBackend", "VectorizedOptions", "available_backends", "make_backend",
]


class Backend(Protocol):
    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]: ...

    def close(self) -> None: ...


class SequentialBackend:
    """One client after another on one reused model: the reference every other backend matches."""

    def __init__(self, model: FlatModel, data: FederatedDataset, settings: LocalSGD, seed: int) -> None:
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


class VectorizedOptions(Options):
    """``max_clients``: clients trained as one batched group (default: the whole round); lower it to bound memory."""

    max_clients: int | None = Field(None, ge=1)


class MultiprocessOptions(Options):
    """``workers``: worker processes (default, and at most, cores // threads; never more than the round's
    clients); ``threads``: intra-op threads of each worker; ``start_method``: how workers start (default fork
    where available with one thread, else spawn; fork with threads > 1 is refused)."""

    workers: int | None = Field(None, ge=1)
    threads: int = Field(1, ge=1)
    start_method: Literal["fork", "spawn", "forkserver"] | None = None


def _vectorized(**kwargs: Any) -> Backend:
    from fedgma.vectorized import VectorizedBackend

    return VectorizedBackend(**kwargs)


def _multiprocess(**kwargs: Any) -> Backend:
    from fedgma.multiprocess import MultiprocessBackend

    return MultiprocessBackend(**kwargs)  # caps workers at the cores and the round's clients


BACKENDS.register("sequential", SequentialBackend, NoOptions, "one client after another (the reference)")
BACKENDS.register("multiprocess", _multiprocess, MultiprocessOptions, "clients in parallel worker processes")
BACKENDS.register("vectorized", _vectorized, VectorizedOptions, "clients batched with torch.func.vmap (GPU)")


def available_backends() -> list[str]:
    """Names of every registered backend, sorted."""
    return BACKENDS.names()


def make_backend(name: str, model: FlatModel, data: FederatedDataset, settings: LocalSGD, seed: int,
                 **options: Any) -> Backend:
    """Build the backend ``name`` with its validated ``options`` (config table ``[backend]``).

    Options given as None are left at their defaults (a config's unset keys).

    Raises:
        ValueError: an unknown backend, an option it does not take, or a value out of range (one line,
            with a did-you-mean).
    """
    given = {key: value for key, value in options.items() if value is not None}
    return BACKENDS.build(name, given, model=model, data=data, settings=settings, seed=seed)
