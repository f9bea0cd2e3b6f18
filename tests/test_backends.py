"""Every backend replays the reference (sequential) local training: same updates to float tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgma.backends import available_backends, make_backend
from fedgma.client import LocalSGD, PlainClient, ScaffoldClient, batch_schedule
from fedgma.data.arrays import ArrayDataset
from fedgma.data.datasets import load_dataset
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel, build_model
from fedgma.seeding import torch_generator
from fedgma.vectorized import VectorizedBackend, supports_hand_batching, train_clients_vectorized

# sizes chosen so clients have different numbers of steps and short last batches
SIZES = [7, 40, 23, 64, 1, 33, 16, 50]


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


def _round(backend_name: str, model_name: str, data: FederatedDataset, settings: LocalSGD, algorithm=None,
           rounds: int = 1, **options):
    """Run ``rounds`` rounds of FedAvg (mean of updates) with a backend; return the last results and params."""
    model = _model(model_name, data)
    params = model.params.clone()
    algorithm = algorithm or PlainClient(settings)
    backend = make_backend(backend_name, model, data, settings, seed=3, **options)
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


def _assert_agree(reference, other, rtol: float = 1e-4) -> None:
    assert [r.client_id for r in other] == [r.client_id for r in reference]
    for ref, res in zip(reference, other, strict=True):
        assert res.num_steps == ref.num_steps and res.num_samples == ref.num_samples
        assert ref.update.abs().max() > 0, f"client {ref.client_id}: update is zero"
        scale = float(ref.update.abs().max())
        err = float((res.update - ref.update).abs().max())
        assert err <= rtol * scale, f"client {ref.client_id}: max difference {err:.3g} vs scale {scale:.3g}"
        assert res.train_loss == pytest.approx(ref.train_loss, rel=1e-4)


def test_registry_lists_all_backends() -> None:
    assert {"sequential", "vectorized", "multiprocess"} <= set(available_backends())


def test_unknown_backend_is_rejected_with_the_available_names(digits) -> None:
    with pytest.raises(ValueError, match="unknown backend 'vectorised'; available: multiprocess, sequential"):
        make_backend("vectorised", _model("mlp", digits), digits, LocalSGD(), 0)


@pytest.mark.parametrize("model_name", ["mlp", "cnn", "logreg"])
def test_vectorized_matches_sequential_plain_sgd(digits, model_name) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05)
    reference, _ = _round("sequential", model_name, digits, settings)
    vectorized, _ = _round("vectorized", model_name, digits, settings)
    assert len({r.num_steps for r in reference}) > 3  # clients really have different step counts
    _assert_agree(reference, vectorized)


@pytest.mark.parametrize(
    "settings",
    [
        LocalSGD(batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-3),
        LocalSGD(batch_size=8, lr=0.05, prox_mu=0.5),
        LocalSGD(batch_size=16, lr=0.05, epochs=2),
        LocalSGD(batch_size=10, lr=0.05, steps=5),
    ],
    ids=["momentum+wd", "fedprox", "two-epochs", "fixed-steps"],
)
def test_vectorized_matches_sequential_options(digits, settings) -> None:
    reference, ref_params = _round("sequential", "mlp", digits, settings, rounds=2)
    vectorized, vec_params = _round("vectorized", "mlp", digits, settings, rounds=2)
    _assert_agree(reference, vectorized)
    torch.testing.assert_close(vec_params, ref_params, rtol=1e-4, atol=1e-5)


def test_vectorized_matches_sequential_scaffold(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05)
    numel = _model("mlp", digits).numel
    ref_alg = ScaffoldClient(settings, numel, digits.num_clients)
    vec_alg = ScaffoldClient(settings, numel, digits.num_clients)
    reference, _ = _round("sequential", "mlp", digits, settings, ref_alg, rounds=3)
    vectorized, _ = _round("vectorized", "mlp", digits, settings, vec_alg, rounds=3)
    assert float(ref_alg.server_control.abs().max()) > 0  # corrections were really non-zero in rounds 2-3
    _assert_agree(reference, vectorized)
    torch.testing.assert_close(vec_alg.server_control, ref_alg.server_control, rtol=1e-3, atol=1e-5)


def test_vmap_method_matches_sequential(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05, momentum=0.5)
    reference, _ = _round("sequential", "mlp", digits, settings)
    vectorized, _ = _round("vectorized", "mlp", digits, settings, method="vmap")
    _assert_agree(reference, vectorized)


def test_vectorized_groups_give_the_same_results(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05)
    whole, _ = _round("vectorized", "mlp", digits, settings)
    grouped, _ = _round("vectorized", "mlp", digits, settings, max_clients=3)
    _assert_agree(whole, grouped)


def test_vectorized_is_deterministic(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05, momentum=0.9)
    first, p1 = _round("vectorized", "cnn", digits, settings, rounds=2)
    second, p2 = _round("vectorized", "cnn", digits, settings, rounds=2)
    assert torch.equal(p1, p2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.update, b.update) and a.train_loss == b.train_loss


def test_a_client_alone_in_its_last_steps_still_matches(digits) -> None:
    """One big client and one tiny one: most steps run with a single active client."""
    data = FederatedDataset([digits.clients[3], digits.clients[4]], digits.test, 10)
    settings = LocalSGD(batch_size=8, lr=0.05)
    reference, _ = _round("sequential", "mlp", data, settings)
    vectorized, _ = _round("vectorized", "mlp", data, settings)
    assert [r.num_steps for r in reference] == [8, 1]
    _assert_agree(reference, vectorized)


def test_train_clients_vectorized_padding_has_no_effect(digits) -> None:
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


def test_hand_batching_support_detection(digits) -> None:
    assert supports_hand_batching(build_model("cnn", (1, 8, 8), 10, torch_generator(0, "init")))
    assert not supports_hand_batching(build_model("resnet", (1, 8, 8), 10, torch_generator(0, "init")))


def test_vectorized_rejects_bad_options(digits) -> None:
    model = _model("mlp", digits)
    with pytest.raises(ValueError, match="max_clients must be ≥ 1, got 0"):
        VectorizedBackend(model, digits, LocalSGD(), 0, max_clients=0)
    with pytest.raises(ValueError, match="method must be 'auto', 'hand' or 'vmap', got 'jit'"):
        VectorizedBackend(model, digits, LocalSGD(), 0, method="jit")
    resnet = FlatModel(build_model("resnet", (1, 8, 8), 10, torch_generator(0, "init")))
    with pytest.raises(ValueError, match="method='hand' needs a Sequential"):
        VectorizedBackend(resnet, digits, LocalSGD(), 0, method="hand")


def test_multiprocess_matches_sequential(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05, momentum=0.9)
    reference, ref_params = _round("sequential", "mlp", digits, settings, rounds=2)
    parallel, par_params = _round("multiprocess", "mlp", digits, settings, rounds=2, workers=2)
    _assert_agree(reference, parallel)
    torch.testing.assert_close(par_params, ref_params, rtol=1e-4, atol=1e-5)


def test_multiprocess_scaffold_matches_sequential(digits) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05)
    numel = _model("mlp", digits).numel
    reference, _ = _round("sequential", "mlp", digits, settings, ScaffoldClient(settings, numel, 8), rounds=2)
    parallel, _ = _round("multiprocess", "mlp", digits, settings, ScaffoldClient(settings, numel, 8), rounds=2,
                         workers=2)
    _assert_agree(reference, parallel)


def test_multiprocess_rejects_bad_options(digits) -> None:
    model = _model("mlp", digits)
    with pytest.raises(ValueError, match="workers must be ≥ 1, got -1"):
        make_backend("multiprocess", model, digits, LocalSGD(), 0, workers=-1)
    with pytest.raises(ValueError, match="threads must be ≥ 1, got 0"):
        make_backend("multiprocess", model, digits, LocalSGD(), 0, threads=0)


def test_multiprocess_handles_rounds_larger_than_the_first_and_abandoned_rounds(digits) -> None:
    """Update slots are sized by the first round: a larger round restarts the pool with more slots, and a
    round whose results were not all read is finished before the next one reuses the slots."""
    settings = LocalSGD(batch_size=8, lr=0.05)
    model = _model("mlp", digits)
    params = model.params.clone()
    backend = make_backend("multiprocess", model, digits, settings, seed=3, workers=2)
    sequential = make_backend("sequential", _model("mlp", digits), digits, settings, seed=3)
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
    settings = LocalSGD(batch_size=8, lr=0.05)
    model = _model("mlp", data)
    params = model.params.clone()
    backend = make_backend("multiprocess", model, data, settings, seed=3, workers=2)
    try:
        # client 3 fails first on its worker (0 steps: scheduled last, so its worker's other clients come
        # after it in reply order); their replies must not leak into the next round
        with pytest.raises(RuntimeError, match=r"failed on client 3:(.|\n)*a client with no samples cannot train"):
            list(backend.train(params, [3, 0, 1, 2], 1, PlainClient(settings)))
        reference = list(make_backend("sequential", _model("mlp", data), data, settings, seed=3)
                         .train(params, [0, 1, 2], 2, PlainClient(settings)))
        _assert_agree(reference, list(backend.train(params, [0, 1, 2], 2, PlainClient(settings))))  # still usable
        process = backend._workers[1][0]
        process.kill()
        process.join()
        with pytest.raises(RuntimeError, match=r"worker 1 \(pid \d+\) died with exit code -9"):
            list(backend.train(params, [0, 1], 3, PlainClient(settings)))
    finally:
        backend.close()
