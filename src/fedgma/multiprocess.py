"""Multi-process local training: the round's clients spread over worker processes, one core each.

For models too large to batch across clients (a CNN whose single-client step already fills the
cache), the way to use every core is to train different clients at the same time in different
processes, each with one intra-op thread, rather than one client with every core, where small
convolutions and matrix products scale poorly across threads.

Workers are started once (fork where the platform has it, so they share the client data with the
parent copy-on-write; spawn elsewhere) and live until ``close()``. Each round the global parameters
are written into one shared-memory vector the workers read, SCAFFOLD's corrections and the clients'
updates go through shared-memory slots (one per client of the round), so a task is only ``(round,
client id, slot)`` and the pipe carries the small rest of the client's
:class:`~fedgma.client.ClientResult`. Each worker runs the reference
:func:`~fedgma.client.train_client` with the per-client generator, so results equal the sequential
backend's up to the float differences of a different thread count, and come back in the order of
the client ids.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fedgma.client import ClientAlgorithm, ClientResult, LocalSGD, train_client
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel
from fedgma.seeding import torch_generator

__all__ = ["MultiprocessBackend"]

_WORKER: dict[str, Any] = {}


def _init_worker(module: torch.nn.Module, data: FederatedDataset, settings: LocalSGD, seed: int,
                 shared_params: Tensor, slots: Tensor, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER.update(model=FlatModel(module), data=data, settings=settings, seed=seed, params=shared_params,
                   slots=slots)


def _train_one(task: tuple[int, int, int, bool]) -> ClientResult:
    """Train one client; its update goes to its slot of the shared buffer, the rest of the reply by pipe."""
    round_index, client_id, slot, corrected = task
    w = _WORKER
    updates, corrections = w["slots"]
    result = train_client(
        w["model"],
        w["params"],
        w["data"].clients[client_id],
        w["settings"],
        torch_generator(w["seed"], "client", round_index, client_id),
        correction=corrections[slot] if corrected else None,
        client_id=client_id,
    )
    updates[slot].copy_(result.update)
    result.update = torch.empty(0)
    return result


class MultiprocessBackend:
    """Train the round's clients in ``workers`` processes (default: every core), ``threads`` each."""

    def __init__(
        self,
        model: FlatModel,
        data: FederatedDataset,
        settings: LocalSGD,
        seed: int,
        workers: int | None = None,
        threads: int = 1,
        start_method: str | None = None,
        **_: Any,
    ) -> None:
        workers = workers or os.cpu_count() or 1
        if workers < 1:
            raise ValueError(f"backend option workers must be ≥ 1, got {workers}")
        if threads < 1:
            raise ValueError(f"backend option threads must be ≥ 1, got {threads}")
        if model.params.device.type != "cpu":
            raise ValueError("the multiprocess backend trains on CPU; use backend 'sequential' or 'vectorized' "
                             f"on {model.params.device}")
        methods = multiprocessing.get_all_start_methods()
        start_method = start_method or ("fork" if "fork" in methods else "spawn")
        if start_method not in methods:
            raise ValueError(f"backend option start_method must be one of {', '.join(methods)}, got {start_method!r}")
        self.model, self.data, self.settings, self.seed = model, data, settings, seed
        self.workers, self.threads, self.start_method = workers, threads, start_method
        self._shared = torch.zeros(model.numel, dtype=model.params.dtype).share_memory_()
        self._slots: Tensor | None = None  # [2, clients per round, d]: updates and corrections
        self._pool: Any = None
        self._pending: Iterator[ClientResult] | None = None

    def _start(self, clients_per_round: int) -> None:
        import torch.multiprocessing as tmp

        # Vectors travel through shared memory made before the workers start: pickling a tensor per
        # task or reply costs a new shared-memory segment and a file descriptor sent over a socket
        # each time, which kept the parent busy for a third of the round on the MLP.
        self._slots = torch.zeros(2, clients_per_round, self.model.numel, dtype=self.model.params.dtype)
        self._slots.share_memory_()
        context = tmp.get_context(self.start_method)
        self._pool = context.Pool(
            self.workers,
            initializer=_init_worker,
            initargs=(self.model.module, self.data, self.settings, self.seed, self._shared, self._slots,
                      self.threads),
        )

    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]:
        if self._pending is not None:  # a previous round's generator was abandoned: let its tasks finish
            for _ in self._pending:
                pass
            self._pending = None
        if self._slots is not None and len(client_ids) > self._slots.shape[1]:
            self.close()  # more clients than slots (a round larger than the first): restart with more
        if self._pool is None:
            self._start(len(client_ids))
        assert self._slots is not None
        updates, corrections = self._slots
        self._shared.copy_(params)
        # Submitted longest client first (by records, a proxy for local steps), so the pool's dynamic
        # hand-out finishes the round sooner (LPT scheduling); yielded in client order, like every backend.
        slot_of = {int(c): i for i, c in enumerate(client_ids)}
        results = {}
        for c in sorted(slot_of, key=lambda c: (-len(self.data.clients[c]), c)):
            correction = algorithm.correction(c)
            if correction is not None:
                corrections[slot_of[c]].copy_(correction)
            task = (round_index, c, slot_of[c], correction is not None)
            results[c] = self._pool.apply_async(_train_one, (task,))

        def collect() -> Iterator[ClientResult]:
            for c in client_ids:
                result = results[int(c)].get()
                result.update = updates[slot_of[int(c)]].clone()  # the slot is reused next round
                yield result

        self._pending = collect()
        yield from self._pending
        self._pending = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
        self._slots = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.terminate()
