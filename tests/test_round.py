"""A round commits every state change or none (issue 13, item 1).

For every recipe, and every pair of a registered client algorithm and server optimizer, a round
skipped for too few replies leaves the whole :meth:`ServerState.state_dict` bit-identical (the round
counter and the step count aside), and a round that raises (a bad reply under
``on_bad_update = "fail"``, a non-finite aggregate, a server step to a non-finite model) leaves it
bit-identical, round counter included. The digits scenario of the issue runs end to end: SCAFFOLD with
one crash per round and a quorum of 3 of 3 never moves c nor any c_i.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

import fedgma.simulation
from fedgma.aggregation import make_aggregator
from fedgma.algorithms import RECIPES
from fedgma.client import ClientResult
from fedgma.config import load_config
from fedgma.registry import CLIENT_ALGORITHMS, SERVER_OPTIMIZERS
from fedgma.round import BadUpdateError, ReplyPolicy, ServerState, run_round
from fedgma.simulation import build_state, run

D = 40  # parameters of the toy "model"
NUM_CLIENTS = 4


class _Params:
    """Just enough of a FlatModel for :func:`build_state`: a flat parameter vector and its size."""

    def __init__(self, generator: torch.Generator) -> None:
        self.params = torch.randn(D, generator=generator)
        self.numel = D


def _overrides(recipe: str, client: str | None = None, server: str | None = None) -> list[str]:
    overrides = [f"algorithm={recipe}", f"data.num_clients={NUM_CLIENTS}", "server.clients_per_round=3",
                 "server.min_clients=3", "client.lr=0.1"]
    if client is not None:
        overrides.append(f"client.algorithm={client}")
        if client == "scaffold":
            overrides.append("client.prox_mu=0")
    if server is not None:
        overrides.append(f"server.optimizer={server}")
        if server == "sgd":
            overrides.append("server.optimizer.momentum=0.9")  # a moment to keep unchanged
    return overrides


CASES = [pytest.param(_overrides(name), id=f"recipe-{name}") for name in sorted(RECIPES)] + [
    pytest.param(_overrides("fedavg", client, server), id=f"{client}+{server}")
    for client in CLIENT_ALGORITHMS.names() for server in SERVER_OPTIMIZERS.names()
] + [pytest.param([*_overrides("scaffold"), "client.algorithm.memory_mb=0"], id="scaffold-spilled-to-disk")]


def _state(overrides: list[str], tmp_path) -> ServerState:
    config = load_config(None, overrides)
    spill = tmp_path if config.client.algorithm.options.get("memory_mb") == 0 else None  # c_i in a file, not RAM
    return build_state(config, _Params(torch.Generator().manual_seed(0)), NUM_CLIENTS, spill)  # type: ignore[arg-type]


def _replies(seed: int, clients: list[int], scale: float = 0.01) -> list[ClientResult]:
    generator = torch.Generator().manual_seed(seed)
    return [ClientResult(c, torch.randn(D, generator=generator) * scale, 10 + c, 3, 0.5) for c in clients]


def _policy(on_bad_update: str = "fail") -> ReplyPolicy:
    return ReplyPolicy(D, None, on_bad_update, min_clients=3)


def _gma() -> Any:
    return make_aggregator("gma", threshold=0.4)


def _snapshot(state: ServerState) -> dict[str, Any]:
    """The state as plain data, each client's control variate read out (a spilled store's state_dict is a reference)."""
    snapshot = state.state_dict()
    store = getattr(state.client_algorithm, "store", None)
    if store is not None:
        snapshot["client_algorithm"]["store"] = {c: store.get(c).clone() for c in range(NUM_CLIENTS)}
    return snapshot


def _assert_identical(before: Any, after: Any, where: str = "state") -> None:
    """Bit-identical nested state: same keys, same types, tensors equal with the same dtype."""
    if isinstance(before, torch.Tensor):
        assert isinstance(after, torch.Tensor) and before.dtype == after.dtype, where
        assert torch.equal(before, after), f"{where} changed"
    elif isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), f"{where}: keys {before.keys()} → {after}"
        for key in before:
            _assert_identical(before[key], after[key], f"{where}.{key}")
    elif isinstance(before, (list, tuple)):
        assert type(after) is type(before) and len(after) == len(before), where
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            _assert_identical(a, b, f"{where}[{i}]")
    else:
        assert before == after, f"{where}: {before!r} → {after!r}"


def _committed_round(state: ServerState) -> None:
    """One committed round of all 4 clients, so moments, c and every c_i are non-trivial."""
    state, outcome = run_round(state, 1, _replies(1, [0, 1, 2, 3]), _gma, _policy())
    assert outcome.committed


@pytest.mark.parametrize("overrides", CASES)
def test_a_round_skipped_for_too_few_replies_changes_no_state(overrides, tmp_path):
    state = _state(overrides, tmp_path)
    _committed_round(state)
    before = _snapshot(state)
    replies = _replies(2, [0, 2])  # 2 replies, min_clients 3
    steps = sum(r.num_steps for r in replies)
    state, outcome = run_round(state, 2, replies, _gma, _policy(), dropped={3: "crashed"})
    assert not outcome.committed and outcome.dropped == {3: "crashed"}
    after = _snapshot(state)
    assert (after.pop("round"), before.pop("round")) == (2, 1)  # the skipped round still counts as played
    assert after.pop("total_steps") == before.pop("total_steps") + steps  # work done, dropped or not
    _assert_identical(before, after)
    assert torch.equal(outcome.update, torch.zeros(D))


@pytest.mark.parametrize("overrides", CASES)
def test_a_round_with_a_bad_reply_under_fail_changes_no_state(overrides, tmp_path):
    state = _state(overrides, tmp_path)
    _committed_round(state)
    before = _snapshot(state)
    replies = _replies(2, [0, 1, 2])
    replies[2].update = torch.full((D,), float("nan"))
    with pytest.raises(BadUpdateError, match="^round 2: client 2 "):
        run_round(state, 2, replies, _gma, _policy("fail"))
    _assert_identical(before, _snapshot(state))


class _BrokenAggregator:
    """An aggregator whose result is non-finite (``value`` everywhere), whatever it was given."""

    def __init__(self, value: float) -> None:
        self.value = value

    def add(self, update: torch.Tensor, weight: float = 1.0) -> None:
        pass

    def result(self) -> tuple[torch.Tensor, dict[str, Any]]:
        return torch.full((D,), self.value), {}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("overrides", CASES)
def test_a_round_whose_aggregate_would_make_the_model_non_finite_changes_no_state(overrides, value, tmp_path):
    """The server optimizer computes its new moments, sees a non-finite model and keeps the old ones."""
    state = _state(overrides, tmp_path)
    _committed_round(state)
    before = _snapshot(state)
    with pytest.raises(FloatingPointError, match="^round 2: the aggregate would make the global model non-finite"):
        run_round(state, 2, _replies(2, [0, 1, 2]), lambda: _BrokenAggregator(value), _policy())
    _assert_identical(before, _snapshot(state))


def test_optimizer_steps_that_stay_finite_are_unchanged_by_the_transaction():
    """The transactional step gives the numbers of the in-place reference (Reddi et al. 2021, Algorithm 2)."""
    generator = torch.Generator().manual_seed(4)
    params, grads = torch.randn(D, generator=generator), [torch.randn(D, generator=generator) for _ in range(3)]
    adam = SERVER_OPTIMIZERS.build("adam", {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-3})
    m, v, theta = torch.zeros(D), torch.full((D,), 1e-6), params.clone()
    for g in grads:
        params = adam.step(params, g)
        m.mul_(0.9).add_(g, alpha=1 - 0.9)
        v.mul_(0.99).add_(g * g, alpha=1 - 0.99)
        theta = theta - 0.1 * m / (v.sqrt() + 1e-3)
    assert torch.equal(params, theta)
    assert torch.equal(adam.state_dict()["m"], m) and torch.equal(adam.state_dict()["v"], v)


def test_scaffold_digits_with_one_crash_per_round_and_a_full_quorum_never_moves_a_control_variate(tmp_path,
                                                                                                  monkeypatch):
    """The issue's scenario: 4 clients, 3 per round, min_clients 3, one crash per round: every round skipped.

    Before the fix the replying clients' c_i moved (‖mean c_i‖ = 0.585 after 3 rounds) while c stayed 0.
    """
    config = load_config(None, [
        "algorithm=scaffold", "data.dataset=digits", "data.partition=iid", "data.num_clients=4",
        "server.clients_per_round=3", "server.min_clients=3", f"faults.crash={1 / 3!r}", "rounds=3",
        "eval_every=3", "client.batch_size=32", "client.lr=0.05", "server.aggregator=mean",
    ])
    states: list[ServerState] = []

    def capture(*args: Any, **kwargs: Any) -> ServerState:
        states.append(build_state(*args, **kwargs))
        return states[-1]

    monkeypatch.setattr(fedgma.simulation, "build_state", capture)
    run(config, tmp_path, progress=False)
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [list(r["faults"].values()) for r in rounds] == [["crash"]] * 3
    assert [r.get("skipped") for r in rounds] == [True] * 3
    (state,) = states
    assert state.round == 3
    algorithm = state.client_algorithm
    assert float(algorithm.server_control.norm()) == 0.0
    assert [float(algorithm.store.get(c).norm()) for c in range(4)] == [0.0] * 4
