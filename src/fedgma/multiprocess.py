"""Multi-process local training: the round's clients spread over worker processes, one core each.

For models too large to batch across clients (a CNN whose single-client step already fills the
cache), the way to use every core is to train different clients at the same time in different
processes, each with one intra-op thread, rather than one client with every core, where small
convolutions and matrix products scale poorly across threads.

Workers are started once (fork where the platform has it, so they share the client data with the
parent copy-on-write; spawn elsewhere) and live until ``close()``. Each round the clients are
assigned to workers longest first (by local steps) to the least-loaded worker (LPT scheduling,
within a few percent of a perfect split on Dirichlet partitions), and each worker gets one message
with its list. Vectors never go through the pipes: the global parameters, SCAFFOLD's corrections
and the clients' updates live in shared memory made before the workers start (one slot per client
of the round); a reply is four numbers. Each worker runs the reference
:func:`~fedgma.client.train_client` with the per-client generator, so results equal the sequential
backend's up to the float differences of a different thread count, and come back in the order of
the client ids. A worker that dies raises an error naming it and its client. Between rounds the
workers also evaluate the global model (:meth:`MultiprocessBackend.evaluate_blocks`, which
``fedgma run`` uses), instead of waiting while the parent does: with 2 workers, evaluating the
FedAvg CNN on 15,999 images takes 0.40× the time of the parent's earlier one-pass evaluation at one
thread, and 0.46× that of its chunked one (``python benchmarks/bench.py --parts eval``,
docs/PERFORMANCE.md).

Workers never outlive the parent: each closes the pipe ends it inherited from the parent (its own
and earlier workers'), so a dead parent means end-of-file on its pipe, and on Linux each also asks
the kernel for SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``), which covers a worker
that is busy training when the parent is killed. Workers are capped at the round's clients and at
the cores (``cores // threads``). ``threads > 1`` needs the spawn or forkserver start method (the
default then): with fork, a worker whose parent already ran OpenMP with several threads hangs in
its first parallel region (GNU libgomp is not fork-safe), so ``start_method = "fork"`` with
``threads > 1`` is refused.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from fedgma.client import ClientAlgorithm, ClientResult, LocalSGD, train_client
from fedgma.data.federated import FederatedDataset
from fedgma.evaluation import Block, BlockResult, evaluate_blocks
from fedgma.models import FlatModel
from fedgma.seeding import torch_generator

__all__ = ["MultiprocessBackend"]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    Returns whether the request was made (False on other platforms or without libc's ``prctl``;
    the closed pipe ends still stop an idle worker there). Exits at once if the parent is already
    gone (it may have died before the request). The signal is tied to the thread that forked this
    process, so backends must be created on a thread that lives as long as they do.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:  # the parent died before the request: no signal will come
        os._exit(0)
    return armed


def _worker_main(connection: Any, module: torch.nn.Module, data: FederatedDataset, settings: LocalSGD, seed: int,
                 shared_params: Tensor, slots: Tensor, threads: int, parent_pid: int = 0,
                 inherited: Sequence[Any] = ()) -> None:
    """A worker: per round, train the listed clients; each update goes to its slot, a short reply by pipe.

    Between rounds it may be asked to evaluate the global model on blocks of the test sets (replies: the
    blocks' results, or a traceback)."""
    for end in inherited:  # the parent's pipe ends a forked worker inherited: closed, so the parent's death is EOF
        end.close()
    if parent_pid:
        die_with_parent(parent_pid)
    torch.set_num_threads(threads)
    model = FlatModel(module)
    updates, corrections = slots
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if message is None:
            return
        if message[0] == "evaluate":  # ("evaluate", blocks): the global model (in shared memory) on test blocks
            try:
                reply = (evaluate_blocks(model, shared_params, data, message[1]), None)
            except Exception:  # reported in the parent, which raises
                reply = (None, traceback.format_exc())
            try:
                connection.send(reply)
            except OSError:  # BrokenPipeError: the parent is gone
                return
            continue
        round_index, tasks = message
        for client_id, slot, corrected in tasks:
            try:
                result = train_client(
                    model,
                    shared_params,
                    data.clients[client_id],
                    settings,
                    torch_generator(seed, "client", round_index, client_id),
                    correction=corrections[slot] if corrected else None,
                    client_id=client_id,
                )
                updates[slot].copy_(result.update)
                reply = (client_id, result.num_samples, result.num_steps, result.train_loss, None)
            except Exception:  # reported in the parent, which raises
                reply = (client_id, 0, 0, 0.0, traceback.format_exc())
            try:
                connection.send(reply)
            except OSError:  # BrokenPipeError: the parent is gone
                return


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform reports it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class MultiprocessBackend:
    """Train the round's clients in ``workers`` processes, ``threads`` intra-op threads each.

    ``workers`` defaults to, and is capped at, ``cores // threads`` (at least 1), and each round
    starts no more workers than it has clients.

    Raises:
        ValueError: ``workers`` or ``threads`` below 1, a model not on the CPU, an unknown start
            method, or ``start_method = "fork"`` with ``threads > 1`` (one line each).
    """

    def __init__(
        self,
        model: FlatModel,
        data: FederatedDataset,
        settings: LocalSGD,
        seed: int,
        workers: int | None = None,
        threads: int = 1,
        start_method: str | None = None,
    ) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"backend option workers must be ≥ 1, got {workers}")
        if threads < 1:
            raise ValueError(f"backend option threads must be ≥ 1, got {threads}")
        cores = max(1, available_cores() // threads)
        workers = min(workers or cores, cores)  # more processes than cores only time-share them
        if model.params.device.type != "cpu":
            raise ValueError("the multiprocess backend trains on CPU; use backend 'sequential' or 'vectorized' "
                             f"on {model.params.device}")
        methods = multiprocessing.get_all_start_methods()
        start_method = start_method or ("fork" if "fork" in methods and threads == 1 else "spawn")
        if start_method not in methods:
            raise ValueError(f"backend option start_method must be one of {', '.join(methods)}, got {start_method!r}")
        if start_method == "fork" and threads > 1:
            raise ValueError(f"backend option threads = {threads} needs start_method 'spawn' or 'forkserver' "
                             "(forked workers hang in OpenMP once the parent has used several threads)")
        self.model, self.data, self.settings, self.seed = model, data, settings, seed
        self.workers, self.threads, self.start_method = workers, threads, start_method
        self._shared = torch.zeros(model.numel, dtype=model.params.dtype).share_memory_()
        self._slots: Tensor | None = None  # [2, clients per round, d]: updates and corrections
        self._workers: list[tuple[Any, Any]] = []  # (process, connection)
        self._pending: Iterator[ClientResult] | None = None

    def _start(self, clients_per_round: int) -> None:
        import torch.multiprocessing as tmp

        # Pickling a tensor per task or reply would cost a new shared-memory segment and a file
        # descriptor sent over a socket each time, which kept the parent busy for a third of the round.
        self._slots = torch.zeros(2, clients_per_round, self.model.numel, dtype=self.model.params.dtype)
        self._slots.share_memory_()
        context = tmp.get_context(self.start_method)
        for _ in range(min(self.workers, clients_per_round)):
            parent_end, child_end = context.Pipe()
            # a forked worker inherits every parent end made so far (its own included): it closes them
            inherited = [parent_end, *(end for _, end in self._workers)] if self.start_method == "fork" else []
            process = context.Process(
                target=_worker_main,
                args=(child_end, self.model.module, self.data, self.settings, self.seed, self._shared, self._slots,
                      self.threads, os.getpid(), inherited),
                daemon=True,
            )
            process.start()
            child_end.close()
            self._workers.append((process, parent_end))

    def _schedule(self, client_ids: Sequence[int]) -> list[list[int]]:
        """LPT: clients longest first (by local steps), each to the least-loaded worker.

        Each worker then trains its clients in the round's order, which is the order the parent folds
        them in (it must, for the same bits): replies then come about when the parent needs them, and
        it aggregates while the workers train instead of all at once after the longest client.
        """
        steps = {c: self.settings.num_steps(len(self.data.clients[c])) for c in client_ids}
        loads = [0] * len(self._workers)
        assignment: list[list[int]] = [[] for _ in self._workers]
        for c in sorted(client_ids, key=lambda c: (-steps[c], c)):
            worker = loads.index(min(loads))
            assignment[worker].append(c)
            loads[worker] += steps[c]
        position = {c: i for i, c in enumerate(client_ids)}
        return [sorted(clients, key=position.__getitem__) for clients in assignment]

    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]:
        """Train ``client_ids`` from ``params``; yield their results in the order of the ids.

        Each result's ``update`` [d] is a view of the client's shared-memory slot, not a copy (the
        parent copies nothing while the workers train): it stays valid until the next call of
        ``train``; clone it to keep it longer.

        Raises:
            RuntimeError: a client failed in its worker (with the worker's traceback) or a worker died.
        """
        self._finish_pending()
        client_ids = [int(c) for c in client_ids]
        if self._slots is not None and len(client_ids) > self._slots.shape[1]:
            self.close()  # more clients than slots (a round larger than the first): restart with more
        if not self._workers:
            self._start(len(client_ids))
        assert self._slots is not None
        updates, corrections = self._slots
        self._shared.copy_(params)
        slot_of = {c: i for i, c in enumerate(client_ids)}
        owner = {}
        for worker, clients in enumerate(self._schedule(client_ids)):
            tasks = []
            for c in clients:
                correction = algorithm.correction(c)
                if correction is not None:
                    corrections[slot_of[c]].copy_(correction)
                tasks.append((c, slot_of[c], correction is not None))
                owner[c] = worker
            if tasks:
                try:
                    self._workers[worker][1].send((round_index, tasks))
                except OSError:  # BrokenPipeError: the worker is gone
                    raise self._died(worker, tasks[0][0]) from None

        outstanding = [0] * len(self._workers)
        for c in client_ids:
            outstanding[owner[c]] += 1

        def receive(worker: int, client_id: int) -> tuple:
            reply = self._receive(worker, client_id)
            outstanding[worker] -= 1
            return reply

        def collect() -> Iterator[ClientResult]:
            received: dict[int, tuple] = {}
            try:
                for c in client_ids:
                    while c not in received:  # a worker replies in its task order: buffer the others
                        reply = receive(owner[c], c)
                        received[reply[0]] = reply
                    client_id, num_samples, num_steps, train_loss, error = received.pop(c)
                    if error is not None:
                        raise RuntimeError(f"multiprocess worker {owner[c]} failed on client {client_id}:\n{error}")
                    # a view of the client's slot, not a copy: valid until the next call of train
                    yield ClientResult(client_id, updates[slot_of[c]], num_samples, num_steps, train_loss)
            finally:
                # a round that failed, or was closed before its last result (abandoned and garbage-collected, say):
                # read the replies still owed, so that none reaches the next round or evaluation
                with contextlib.suppress(RuntimeError):  # a dead worker owes nothing; the error that ends the run
                    for worker, count in enumerate(outstanding):
                        for _ in range(count):
                            receive(worker, -1)

        self._pending = collect()
        yield from self._pending
        self._pending = None

    def _finish_pending(self) -> None:
        """A previous round's generator that was abandoned: let its clients finish and read their replies."""
        if self._pending is not None:
            for _ in self._pending:
                pass
            self._pending = None

    def evaluate_blocks(self, params: Tensor, blocks: Sequence[Block]) -> list[BlockResult]:
        """The results of ``blocks`` (see :mod:`fedgma.evaluation`) for ``params`` [d], computed in the workers.

        The workers are idle while the parent evaluates, so they share the blocks (each to the
        least-loaded worker, by samples) and the parent only adds up their results: the evaluation takes
        about 1/workers of its time in the parent, with the same bits when the parent runs as many
        threads as each worker. Before the first round (no workers yet) the parent evaluates.

        Raises:
            RuntimeError: a block failed in its worker (with the worker's traceback) or a worker died.
        """
        if not self._workers:
            return evaluate_blocks(self.model, params, self.data, blocks)
        self._finish_pending()
        self._shared.copy_(params)
        loads = [0] * len(self._workers)
        assignment: list[list[int]] = [[] for _ in self._workers]
        for i, block in enumerate(blocks):
            worker = loads.index(min(loads))
            assignment[worker].append(i)
            loads[worker] += block.stop - block.start
        busy = [w for w, indices in enumerate(assignment) if indices]
        for w in busy:
            try:
                self._workers[w][1].send(("evaluate", [blocks[i] for i in assignment[w]]))
            except OSError:  # BrokenPipeError: the worker is gone
                raise self._died(w, None) from None
        results: list[BlockResult | None] = [None] * len(blocks)
        errors = []
        for w in busy:  # every busy worker replies once, errors or not: no stale reply reaches the next round
            replied, error = self._receive(w, None)
            if error is not None:
                errors.append(f"multiprocess worker {w} failed evaluating the global model:\n{error}")
                continue
            for i, result in zip(assignment[w], replied, strict=True):
                results[i] = BlockResult(*result)
        if errors:
            raise RuntimeError(errors[0])
        return results  # type: ignore[return-value]

    def _receive(self, worker: int, client_id: int | None) -> tuple:
        try:
            return self._workers[worker][1].recv()
        except (EOFError, OSError):
            raise self._died(worker, client_id) from None

    def _died(self, worker: int, client_id: int | None) -> RuntimeError:
        process = self._workers[worker][0]
        process.join(timeout=1)
        task = "its share of the evaluation" if client_id is None else f"client {client_id} of this round"
        return RuntimeError(
            f"multiprocess worker {worker} (pid {process.pid}) died with exit code {process.exitcode} "
            f"before {task} finished"
        )

    def close(self) -> None:
        for _, connection in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                connection.send(None)
        for process, connection in self._workers:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join()
            connection.close()
        self._workers = []
        self._slots = None
        self._pending = None

    def __del__(self) -> None:
        for process, _ in getattr(self, "_workers", []):
            if process.is_alive():
                process.terminate()
