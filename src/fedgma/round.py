"""One round of federated learning over an explicit server state: the function every engine calls.

The simulator (:func:`fedgma.simulation.run`), the Flower engine and the benchmarks all run
rounds through :func:`run_round`; only where the replies come from differs (local training, Flower
messages). The shape follows FedJAX's ``FederatedAlgorithm.apply(state, clients) -> (state,
diagnostics)``:

    replies ──► check each (shape, dtype, finite, norm) ──► stage client state, fold into the aggregator
            ──► enough replies?  yes: aggregate, server step, commit client state
                                 no:  abort: the whole state stays bit-identical

A round commits every state change or none: the client algorithm only stages its changes until
the round commits (SCAFFOLD's c_i and c), the server optimizer steps only on commit, and a round
that would make the global model non-finite raises before anything is changed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from fedgma.aggregation import Aggregator
from fedgma.client import ClientAlgorithm, ClientResult
from fedgma.robust import update_problem
from fedgma.server_opt import ServerOptimizer

__all__ = ["BadUpdateError", "ReplyPolicy", "RoundOutcome", "ServerState", "run_round"]

log = logging.getLogger(__name__)


class BadUpdateError(ValueError):
    """A client sent an unusable update and ``server.on_bad_update = "fail"``; names the client and round."""


@dataclass
class ServerState:
    """Everything a run carries from one round to the next; a checkpoint is exactly this.

    Attributes:
        round: rounds completed (0 before the first).
        params: the global model as one flat float32 vector, shape [d].
        server_optimizer: the server optimizer, whose moments are part of the state.
        client_algorithm: the client algorithm's server-side state (SCAFFOLD's c and the c_i store).
        total_steps: local SGD steps taken by every client so far (replies that were dropped included).
    """

    round: int
    params: Tensor
    server_optimizer: ServerOptimizer
    client_algorithm: ClientAlgorithm
    total_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The state as plain data on the CPU (tensors, numbers, dicts), for :func:`fedgma.checkpoint`."""
        return {
            "round": self.round,
            "params": self.params.cpu(),
            "server_optimizer": _to_device(self.server_optimizer.state_dict(), "cpu"),
            "client_algorithm": _to_device(self.client_algorithm.state_dict(), "cpu"),
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (tensors move to this state's device)."""
        device = self.params.device
        self.round = int(state["round"])
        self.params = state["params"].to(device)
        self.server_optimizer.load_state_dict(_to_device(state["server_optimizer"], device))
        self.client_algorithm.load_state_dict(state["client_algorithm"])
        self.total_steps = int(state["total_steps"])


@dataclass(frozen=True)
class ReplyPolicy:
    """What the server accepts (``[server]``): reply checks, what to do with a bad one, the quorum.

    Attributes:
        numel: d, the number of model parameters every update must have.
        max_update_norm: refuse updates whose L2 norm exceeds this (None: no limit).
        on_bad_update: ``"fail"`` raises :class:`BadUpdateError`; ``"drop"`` logs and skips the client.
        min_clients: fewer accepted replies than this and the round is skipped (state unchanged).
    """

    numel: int
    max_update_norm: float | None = None
    on_bad_update: str = "fail"
    min_clients: int = 1


@dataclass
class RoundOutcome:
    """What a round did: the accepted replies (updates freed), the dropped ones, and statistics.

    ``committed`` is False for a round skipped for too few replies; then ``update`` is zeros.
    ``stats`` holds the aggregator's statistics (e.g. GMA's mask density, per-layer densities,
    agreement histogram) and the client algorithm's (e.g. SCAFFOLD's ‖c‖).
    """

    committed: bool
    update: Tensor
    accepted: list[ClientResult] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    algorithm_stats: dict[str, Any] = field(default_factory=dict)
    local_steps: int = 0


def run_round(
    state: ServerState,
    round_index: int,
    replies: Iterable[ClientResult],
    make_aggregator: Callable[[], Aggregator],
    policy: ReplyPolicy,
    dropped: dict[int, str] | None = None,
) -> tuple[ServerState, RoundOutcome]:
    """Check, aggregate and apply one round's replies; return the new state and what happened.

    Args:
        state: the state before the round; its ``params`` are what the clients trained from.
        round_index: the round's number (1-based), for messages and logs.
        replies: the round's client results, consumed one at a time (a lazy iterator keeps memory
            at O(d) whatever the number of clients): each update [d] with its sample count.
        make_aggregator: a fresh aggregator for this round (``server.aggregator``, with clipping). Its
            result is the pseudo-gradient's negative; if its stats carry ``step_mask`` (a tensor [d] in
            [0, 1]), the server optimizer steps on the unmasked update and the *step* is masked instead:
            θ ← θ + step_mask ⊙ (opt.step(θ, −update) − θ) (``step_mask`` is removed from the stats).
        policy: reply checks and quorum.
        dropped: clients already known not to reply (client id -> reason), reported in the outcome.

    Returns:
        ``(state, outcome)``: the same state object, updated in place when the round commits and left
        bit-identical when it is skipped, and the round's :class:`RoundOutcome`.

    Raises:
        BadUpdateError: a bad reply under ``on_bad_update = "fail"``.
        FloatingPointError: the aggregate is non-finite or would make the global model non-finite; the
            whole state (global model, server optimizer moments, client algorithm state) is left as it was.
    """
    dropped = dict(dropped or {})
    aggregator = make_aggregator()
    algorithm = state.client_algorithm
    algorithm.begin_round(state.params)
    accepted: list[ClientResult] = []
    steps = 0
    try:
        for result in replies:
            steps += result.num_steps
            problem = update_problem(result.update, policy.numel, policy.max_update_norm) or _count_problem(result)
            if problem is not None:
                dropped[result.client_id] = _reject(problem, result.client_id, round_index, policy)
                continue
            algorithm.finish_client(result)
            aggregator.add(result.update, result.num_samples)
            result.update = None  # type: ignore[assignment]  # folded in; free it now
            accepted.append(result)
        if len(accepted) < policy.min_clients:
            log.warning("round %d: %d client(s) replied in time (server.min_clients = %d); round skipped",
                        round_index, len(accepted), policy.min_clients)
            algorithm.abort_round()
            state.round = round_index
            state.total_steps += steps
            outcome = RoundOutcome(False, torch.zeros_like(state.params), accepted, dropped, {}, {"skipped": True},
                                   steps)
            return state, outcome
        update, stats = aggregator.result()
        step_mask = stats.pop("step_mask", None)
        params = state.server_optimizer.step(state.params, -update)
        if step_mask is not None:  # mask the server optimizer's step (ablation gma_mask_after_optimizer)
            params = state.params + step_mask.to(params.dtype) * (params - state.params)
        _check_finite(params, round_index)
    except BaseException:
        algorithm.abort_round()
        raise
    algorithm_stats = algorithm.end_round(accepted)
    state.params = params
    state.round = round_index
    state.total_steps += steps
    return state, RoundOutcome(True, update, accepted, dropped, stats, algorithm_stats, steps)


def _count_problem(result: ClientResult) -> str | None:
    """What is wrong with a reply's sample count (its aggregation weight), or None."""
    n = result.num_samples
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
        return f"sent a sample count of {n!r}, expected a finite number > 0"
    return None


def _reject(problem: str, client_id: int, round_index: int, policy: ReplyPolicy) -> str:
    """Apply ``on_bad_update`` to a bad reply: raise naming the client, or log and return the reason."""
    message = f"round {round_index}: client {client_id} {problem}"
    if policy.on_bad_update == "fail":
        raise BadUpdateError(f"{message} (server.on_bad_update = 'fail'; set it to 'drop' to skip such clients)")
    log.warning("%s; dropped from the round (server.on_bad_update = 'drop')", message)
    return problem


def _check_finite(params: Tensor, round_index: int) -> None:
    if not bool(torch.isfinite(params).all()):
        raise FloatingPointError(
            f"round {round_index}: the aggregate would make the global model non-finite; "
            "lower client.lr or the server optimizer's lr, or set server.max_update_norm / server.clip_norm"
        )


def _to_device(state: Any, device: torch.device | str) -> Any:
    """A copy of a (nested) state dict with every tensor moved to ``device``."""
    if isinstance(state, Tensor):
        return state.to(device)
    if isinstance(state, dict):
        return {k: _to_device(v, device) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_device(v, device) for v in state)
    return state
