"""Every registered backend replays the reference (sequential) local training: the same client updates.

The shared cases run over ``BACKENDS.names()``, so a newly registered backend is tested without
editing a list. Tolerance: each client's update may differ from the sequential one by at most
``RTOL`` of its norm, ‖Δ_backend − Δ_sequential‖ ≤ 1e-4 ‖Δ_sequential‖: batched kernels and other thread
counts sum in another order (measured: about 1e-6 of the norm here). The mean training losses agree to
1e-4 relative. FedProx runs at μ = 0.1: at μ = 0.5 (lr 0.05) the sequential backend itself, at 1 thread
against 2, already differs by up to 1.4e-2 of the norm on some clients, a property of the problem, not
of a backend.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fedgma.backends import available_backends, make_backend
from fedgma.client import LocalSGD, PlainClient, ScaffoldClient, batch_schedule
from fedgma.data.arrays import ArrayDataset
from fedgma.data.datasets import load_dataset
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel, build_model
from fedgma.registry import BACKENDS
from fedgma.seeding import torch_generator
from fedgma.vectorized import train_clients_vectorized

RTOL = 1e-4  # of each client's update norm
LOSS_RTOL = 1e-4
# sizes chosen so clients have different numbers of steps and short last batches
SIZES = [7, 40, 23, 64, 1, 33, 16, 50]
ALL = BACKENDS.names()


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    splits = load_dataset("digits")
    order = np.random.default_rng(0).permutation(len(splits.train))
    parts, start = [], 0
    for size in SIZES:
        parts.append(order[start : start + size])
        start += size
    return FederatedDataset([splits.train.subset(p) for p in parts], splits.test.subset(np.arange(200)), 10)


def _model(name: str, data: FederatedDataset, seed: int = 0) -> FlatModel:
    return FlatModel(build_model(name, data.input_shape, data.num_classes, torch_generator(seed, "init")))


def _rounds(backend_name: str, model_name: str, data: FederatedDataset, settings: LocalSGD, algorithm=None,
            rounds: int = 1, **options):
    """``rounds`` rounds of FedAvg (mean of updates) with a backend; the last round's results and the params."""
    model = _model(model_name, data)
    params = model.params.clone()
    algorithm = algorithm or PlainClient(settings)
    backend = make_backend(backend_name, model, data, settings, 3, **options)
    clients = list(range(data.num_clients))
    try:
        for round_index in range(1, rounds + 1):
            algorithm.begin_round(params)
            results = []
            for result in backend.train(params, clients, round_index, algorithm):
                algorithm.finish_client(result)
                results.append(result)
            algorithm.end_round(results)
            weights = torch.tensor([r.num_samples for r in results], dtype=torch.float32)
            updates = torch.stack([r.update for r in results])
            params = params + (weights[:, None] * updates).sum(0) / weights.sum()
    finally:
        backend.close()
    return results, params


def _assert_agree(reference, other) -> None:
    assert [r.client_id for r in other] == [r.client_id for r in reference]
    for ref, res in zip(reference, other, strict=True):
        assert res.num_steps == ref.num_steps and res.num_samples == ref.num_samples
        scale = float(ref.update.norm())
        assert scale > 0, f"client {ref.client_id}: update is zero"
        err = float((res.update - ref.update).norm())
        assert err <= RTOL * scale, f"client {ref.client_id}: ‖difference‖ {err:.3g} vs ‖update‖ {scale:.3g}"
        assert res.train_loss == pytest.approx(ref.train_loss, rel=LOSS_RTOL)


# --------------------------------------------------------------------------------------------
# The shared suite: every registered backend against the reference
# --------------------------------------------------------------------------------------------

SETTINGS = {
    "sgd": LocalSGD(batch_size=8, lr=0.05),
    "fedprox": LocalSGD(batch_size=8, lr=0.05, prox_mu=0.1),
    "momentum+wd": LocalSGD(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "fixed-steps": LocalSGD(batch_size=10, lr=0.05, steps=5),
}


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("settings", list(SETTINGS), ids=list(SETTINGS))
def test_backend_matches_sequential(digits, backend, settings) -> None:
    settings = SETTINGS[settings]
    reference, ref_params = _rounds("sequential", "mlp", digits, settings, rounds=2)
    results, params = _rounds(backend, "mlp", digits, settings, rounds=2)
    if settings.steps is None:
        assert len({r.num_steps for r in reference}) > 3  # clients really have different step counts
    _assert_agree(reference, results)
    assert float((params - ref_params).norm()) <= RTOL * float(ref_params.norm())


@pytest.mark.parametrize("backend", ALL)
def test_backend_matches_sequential_scaffold(digits, backend) -> None:
    settings = SETTINGS["sgd"]
    numel = _model("mlp", digits).numel
    ref_alg = ScaffoldClient(settings, numel, digits.num_clients)
    alg = ScaffoldClient(settings, numel, digits.num_clients)
    reference, _ = _rounds("sequential", "mlp", digits, settings, ref_alg, rounds=3)
    results, _ = _rounds(backend, "mlp", digits, settings, alg, rounds=3)
    assert float(ref_alg.server_control.abs().max()) > 0  # corrections were really non-zero in rounds 2-3
    _assert_agree(reference, results)
    err = float((alg.server_control - ref_alg.server_control).norm())
    assert err <= RTOL * float(ref_alg.server_control.norm())


@pytest.mark.parametrize("backend", ALL)
def test_backend_matches_sequential_on_a_cnn(digits, backend) -> None:
    reference, _ = _rounds("sequential", "cnn", digits, SETTINGS["sgd"])
    _assert_agree(reference, _rounds(backend, "cnn", digits, SETTINGS["sgd"])[0])


@pytest.mark.parametrize("backend", ALL)
def test_backend_is_deterministic(digits, backend) -> None:
    first, p1 = _rounds(backend, "mlp", digits, SETTINGS["momentum+wd"], rounds=2)
    second, p2 = _rounds(backend, "mlp", digits, SETTINGS["momentum+wd"], rounds=2)
    assert torch.equal(p1, p2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.update, b.update) and a.train_loss == b.train_loss


@pytest.mark.parametrize("backend", ALL)
def test_backend_trains_a_subset_in_the_order_given(digits, backend) -> None:
    settings = SETTINGS["sgd"]
    model = _model("mlp", digits)
    params = model.params.clone()
    clients = [5, 1, 3]
    reference = list(make_backend("sequential", _model("mlp", digits), digits, settings, 3)
                     .train(params, clients, 1, PlainClient(settings)))
    built = make_backend(backend, model, digits, settings, 3)
    try:
        _assert_agree(reference, list(built.train(params, clients, 1, PlainClient(settings))))
    finally:
        built.close()


@pytest.mark.parametrize("backend", ALL)
def test_backend_rejects_an_unknown_option(digits, backend) -> None:
    with pytest.raises(ValueError, match=f"backend {backend!r} has no option 'colour'"):
        make_backend(backend, _model("mlp", digits), digits, LocalSGD(), 0, colour=1)


# --------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------


def test_registry_lists_the_built_in_backends() -> None:
    assert {"sequential", "vectorized", "multiprocess"} <= set(available_backends())
    assert available_backends() == ALL


def test_unknown_backend_is_rejected_with_a_suggestion(digits) -> None:
    with pytest.raises(ValueError, match="unknown backend 'vectorised' \\(did you mean 'vectorized'\\?\\); available"):
        make_backend("vectorised", _model("mlp", digits), digits, LocalSGD(), 0)


def test_options_left_unset_take_their_defaults(digits) -> None:
    backend = make_backend("sequential", _model("mlp", digits), digits, LocalSGD(), 0, workers=None, max_clients=None)
    backend.close()


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("multiprocess", {"workers": 0}, r"option 'workers': .*1"),
        ("multiprocess", {"threads": 0}, r"option 'threads': .*1"),
        ("multiprocess", {"start_method": "thread"}, "option 'start_method'"),
        ("vectorized", {"max_clients": 0}, r"option 'max_clients': .*1"),
        ("vectorized", {"method": "hand"}, "backend 'vectorized' has no option 'method'"),
        ("sequential", {"workers": 2}, "backend 'sequential' has no option 'workers'; it takes: no options"),
    ],
)
def test_bad_options_are_one_line_errors(digits, name, options, message) -> None:
    with pytest.raises(ValueError, match=message) as error:
        make_backend(name, _model("mlp", digits), digits, LocalSGD(), 0, **options)
    assert "\n" not in str(error.value)


def test_multiprocess_workers_are_capped_at_the_core_count(digits, monkeypatch) -> None:
    monkeypatch.setattr("fedgma.multiprocess.available_cores", lambda: 2)
    backend = make_backend("multiprocess", _model("mlp", digits), digits, LocalSGD(), 0, workers=1_000_000_000)
    try:
        assert backend.workers == 2
    finally:
        backend.close()
    backend = make_backend("multiprocess", _model("mlp", digits), digits, LocalSGD(), 0, threads=2,
                           start_method="spawn")
    assert backend.workers == 1  # cores // threads


def test_multiprocess_starts_no_more_workers_than_the_round_has_clients(digits, monkeypatch) -> None:
    monkeypatch.setattr("fedgma.multiprocess.available_cores", lambda: 64)
    settings = SETTINGS["sgd"]
    model = _model("mlp", digits)
    backend = make_backend("multiprocess", model, digits, settings, 3, workers=1_000_000_000)
    try:
        assert backend.workers == 64
        list(backend.train(model.params.clone(), [0, 1, 2], 1, PlainClient(settings)))
        assert len(backend._workers) == 3
    finally:
        backend.close()


def test_multiprocess_refuses_fork_with_several_threads(digits) -> None:
    with pytest.raises(ValueError, match=r"^backend option threads = 2 needs start_method 'spawn' or 'forkserver'"):
        make_backend("multiprocess", _model("mlp", digits), digits, LocalSGD(), 0, threads=2, start_method="fork")


KILL_PARENT = """
import os, sys, time
from fedgma.backends import make_backend
from fedgma.client import LocalSGD, PlainClient
from fedgma.data.datasets import load_dataset
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel, build_model
from fedgma.seeding import torch_generator
import numpy as np
splits = load_dataset("digits")
data = FederatedDataset([splits.train.subset(np.arange(i * 50, i * 50 + 50)) for i in range(4)], splits.test, 10)
model = FlatModel(build_model("mlp", data.input_shape, data.num_classes, torch_generator(0, "init")))
settings = LocalSGD(batch_size=8, lr=0.05, steps={steps})
backend = make_backend("multiprocess", model, data, settings, 0, workers=2)
results = backend.train(model.params.clone(), [0, 1, 2, 3], 1, PlainClient(settings))
{first}
print(" ".join(str(process.pid) for process, _ in backend._workers), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("busy", [False, True], ids=["idle workers", "workers training"])
def test_multiprocess_workers_exit_when_the_parent_is_killed(busy) -> None:
    """SIGKILL of the parent: idle workers see end-of-file on their pipe, busy ones get PR_SET_PDEATHSIG."""
    script = KILL_PARENT.format(steps=10**7 if busy else 1, first="" if busy else "next(results)")
    if busy:  # start the round, then report the pids while the workers train
        script = script.replace("results = backend", "backend._start(4)\nresults = backend")
        script = script.replace("\n\nprint(", "\nimport threading\nthreading.Thread(target=lambda: next(results), "
                                "daemon=True).start()\ntime.sleep(1)\nprint(")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for p in pids if _alive(p)] == []
    finally:
        parent.kill()
        parent.wait()


# --------------------------------------------------------------------------------------------
# Backend-specific behaviour
# --------------------------------------------------------------------------------------------


def test_vectorized_groups_give_the_same_results(digits) -> None:
    whole, _ = _rounds("vectorized", "mlp", digits, SETTINGS["sgd"])
    grouped, _ = _rounds("vectorized", "mlp", digits, SETTINGS["sgd"], max_clients=3)
    _assert_agree(whole, grouped)


def test_vectorized_a_client_alone_in_its_last_steps_still_matches(digits) -> None:
    """One big client and one tiny one: most steps run with a single active client."""
    data = FederatedDataset([digits.clients[3], digits.clients[4]], digits.test, 10)
    reference, _ = _rounds("sequential", "mlp", data, SETTINGS["sgd"])
    vectorized, _ = _rounds("vectorized", "mlp", data, SETTINGS["sgd"])
    assert [r.num_steps for r in reference] == [8, 1]
    _assert_agree(reference, vectorized)


def test_vectorized_padding_has_no_effect(digits) -> None:
    """A short batch padded with weight-0 samples gives the gradient of the real samples only."""
    model = _model("mlp", digits)
    params = model.params.clone()
    data = digits.clients[0]  # 7 samples, batch 4 → batches of 4 and 3
    settings = LocalSGD(batch_size=4, lr=0.1)
    schedule = batch_schedule(len(data), settings, torch_generator(0, "client", 1, 0))
    alone, _, steps = train_clients_vectorized(model, params, [data], [schedule], settings)
    assert steps == [2]
    # the same client, stacked with a copy of itself whose labels differ, is unaffected by its neighbour
    other = ArrayDataset(data.x.flip(0), (data.y + 1) % 10)
    both, _, _ = train_clients_vectorized(model, params, [data, other], [schedule, schedule], settings)
    torch.testing.assert_close(both[0], alone[0], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(both[1], alone[0])


def test_vectorized_runs_models_without_a_sequential_structure(digits) -> None:
    reference, _ = _rounds("sequential", "resnet", digits, LocalSGD(batch_size=16, lr=0.05, steps=2))
    _assert_agree(reference, _rounds("vectorized", "resnet", digits, LocalSGD(batch_size=16, lr=0.05, steps=2))[0])


def test_multiprocess_handles_rounds_larger_than_the_first_and_abandoned_rounds(digits) -> None:
    """Update slots are sized by the first round: a larger round restarts the pool with more slots, and a
    round whose results were not all read is finished before the next one reuses the slots."""
    settings = SETTINGS["sgd"]
    model = _model("mlp", digits)
    params = model.params.clone()
    backend = make_backend("multiprocess", model, digits, settings, 3, workers=2)
    sequential = make_backend("sequential", _model("mlp", digits), digits, settings, 3)
    try:
        for round_index, clients in enumerate([[0, 1], [2, 3, 5, 6, 7], [1, 3]], start=1):
            abandoned = backend.train(params, clients, round_index, PlainClient(settings))
            next(abandoned)  # read one result only
            reference = list(sequential.train(params, clients, round_index, PlainClient(settings)))
            _assert_agree(reference, list(backend.train(params, clients, round_index, PlainClient(settings))))
    finally:
        backend.close()


def test_multiprocess_reports_a_failing_client_and_a_dead_worker(digits) -> None:
    empty = ArrayDataset(digits.clients[0].x[:0], digits.clients[0].y[:0])
    data = FederatedDataset([*digits.clients[:3], empty], digits.test, 10)
    settings = SETTINGS["sgd"]
    model = _model("mlp", data)
    params = model.params.clone()
    backend = make_backend("multiprocess", model, data, settings, 3, workers=2)
    try:
        # client 3 fails first on its worker (first in the round's order, which each worker follows), so its
        # worker's other clients reply after it; their replies must not leak into the next round
        with pytest.raises(RuntimeError, match=r"failed on client 3:(.|\n)*a client with no samples cannot train"):
            list(backend.train(params, [3, 0, 1, 2], 1, PlainClient(settings)))
        reference = list(make_backend("sequential", _model("mlp", data), data, settings, 3)
                         .train(params, [0, 1, 2], 2, PlainClient(settings)))
        _assert_agree(reference, list(backend.train(params, [0, 1, 2], 2, PlainClient(settings))))  # still usable
        process = backend._workers[1][0]
        process.kill()
        process.join()
        with pytest.raises(RuntimeError, match=r"worker 1 \(pid \d+\) died with exit code -9"):
            list(backend.train(params, [0, 1], 3, PlainClient(settings)))
    finally:
        backend.close()
