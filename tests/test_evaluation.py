"""Evaluation in blocks (fedgma.evaluation) and in the multiprocess backend's workers: the same bits.

The block design rests on two properties checked here exactly: a sample's logits do not depend on the
forward chunk it is in (so the chunked forward gives the one-pass loss sum bit for bit), and a set's
metrics do not depend on who computed its blocks or in what order (the parent adds them up in order).
"""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedgma.multiprocess
from fedgma import evaluation
from fedgma.backends import make_backend
from fedgma.client import LocalSGD, PlainClient
from fedgma.config import load_config
from fedgma.data.datasets import load_dataset
from fedgma.data.federated import FederatedDataset
from fedgma.evaluation import BLOCK, FORWARD_CHUNK, Block, BlockResult, blocks_of, evaluate, evaluate_all
from fedgma.models import FlatModel, build_model
from fedgma.registry import MODELS
from fedgma.seeding import torch_generator
from fedgma.simulation import run


@pytest.fixture(scope="module")
def digits() -> FederatedDataset:
    """8 clients, a 2,500-sample test set (3 blocks, the last one short), a validation set, 3 held-out clients."""
    splits = load_dataset("digits")
    order = np.random.default_rng(0).permutation(len(splits.train))
    clients = [splits.train.subset(order[i * 40 : (i + 1) * 40]) for i in range(8)]
    holdout = [splits.train.subset(order[400 + i * 30 : 430 + i * 30]) for i in range(3)]
    big_test = np.random.default_rng(1).integers(0, len(splits.test), size=2 * BLOCK + 500)
    return FederatedDataset(clients, splits.test.subset(big_test), 10,
                            extra_tests={"validation": splits.train.subset(order[500:700])}, holdout_clients=holdout)


def _model(name: str, data: FederatedDataset) -> FlatModel:
    return FlatModel(build_model(name, data.input_shape, data.num_classes, torch_generator(0, "init")))


@pytest.fixture
def one_thread():
    """The parent at one thread, as each worker: the setting where their bits must agree."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", MODELS.names())  # every registered model
def test_the_chunked_forward_gives_the_one_pass_loss_sum_bit_for_bit(digits, one_thread, name) -> None:
    """At one thread (the golden fixtures', the science suite's and the multiprocess workers' default)."""
    model = _model(name, digits)
    x, y = digits.test.x[:BLOCK], digits.test.y[:BLOCK]
    assert len(x) > FORWARD_CHUNK  # the block really is cut into chunks
    with torch.no_grad():
        logits = model(x)
    expected = BlockResult(float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()))
    assert evaluation.evaluate_blocks(model, model.params, digits, [Block("test", 0, BLOCK)]) == [expected]


def test_evaluate_gives_the_mean_loss_and_the_fraction_correct(digits) -> None:
    model = _model("mlp", digits)
    params = model.params + 0.01 * torch.randn(model.numel, generator=torch.Generator().manual_seed(0))
    result = evaluate(model, params, digits.test)
    model.load(params)
    with torch.no_grad():
        logits = model(digits.test.x)
    assert result["accuracy"] == int((logits.argmax(1) == digits.test.y).sum()) / len(digits.test)
    assert result["loss"] == pytest.approx(float(F.cross_entropy(logits, digits.test.y)), rel=1e-6)
    empty = digits.test.subset(np.arange(0))
    assert evaluate(model, params, empty) == {"loss": 0.0, "accuracy": 0.0}


def test_blocks_cover_a_set_once_in_order() -> None:
    assert blocks_of("test", 2 * BLOCK + 5) == [Block("test", 0, BLOCK), Block("test", BLOCK, 2 * BLOCK),
                                                Block("test", 2 * BLOCK, 2 * BLOCK + 5)]
    assert blocks_of("test", 0) == []


def test_evaluate_all_has_the_same_bits_whoever_computes_the_blocks_in_whatever_order(digits) -> None:
    model = _model("mlp", digits)
    params = model.params.clone()
    reference = evaluate_all(model, params, digits)
    assert {"test_accuracy", "test_loss", "validation_accuracy", "validation_loss", "holdout_mean_accuracy",
            "holdout_worst10_accuracy"} <= set(reference)
    seen = []

    def backwards(p, blocks):  # another model, the blocks computed last to first, returned in order
        seen.extend(blocks)
        other = _model("mlp", digits)
        return [evaluation.evaluate_blocks(other, p, digits, [b])[0] for b in reversed(blocks)][::-1]

    assert evaluate_all(model, params, digits, backwards) == reference
    assert {b.name for b in seen} == {"test", "extra/validation", "holdout/0", "holdout/1", "holdout/2"}
    with pytest.raises(RuntimeError, match="the backend evaluated 1 blocks, expected 7"):
        evaluate_all(model, params, digits, lambda p, blocks: [BlockResult(0.0, 0)])


def test_an_unknown_set_is_a_key_error(digits) -> None:
    for name in ["train", "extra/ood/none", "holdout/3", "holdout/x"]:
        with pytest.raises(KeyError, match="no evaluation set"):
            evaluation.evaluation_set(digits, name)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])  # spawn: the workers get the data pickled
def test_the_multiprocess_workers_evaluate_with_the_parents_bits(digits, monkeypatch, one_thread,
                                                                 start_method) -> None:
    settings = LocalSGD(batch_size=8, lr=0.05)
    model = _model("cnn", digits)
    backend = make_backend("multiprocess", model, digits, settings, 3, workers=2, start_method=start_method)
    blocks = [b for name in ["test", "extra/validation", "holdout/0"]
              for b in blocks_of(name, len(evaluation.evaluation_set(digits, name)))]
    try:
        params = model.params.clone()
        before = backend.evaluate_blocks(params, blocks)  # no workers yet: the parent evaluates
        assert before == evaluation.evaluate_blocks(_model("cnn", digits), params, digits, blocks)
        results = list(backend.train(params, [0, 1, 2, 3], 1, PlainClient(settings)))
        params = params + torch.stack([r.update for r in results]).mean(0)
        expected = evaluation.evaluate_blocks(_model("cnn", digits), params, digits, blocks)

        def refuse(*args):
            raise AssertionError("the parent evaluated")

        monkeypatch.setattr(fedgma.multiprocess, "evaluate_blocks", refuse)  # the workers, started, keep theirs
        assert backend.evaluate_blocks(params, blocks) == expected
        with pytest.raises(RuntimeError, match=r"failed evaluating the global model:(.|\n)*no evaluation set 'nope'"):
            backend.evaluate_blocks(params, [*blocks, Block("nope", 0, 1)])
        assert backend.evaluate_blocks(params, blocks) == expected  # no stale reply left behind
        again = list(backend.train(params, [4, 5], 2, PlainClient(settings)))  # and it still trains
        assert [r.client_id for r in again] == [4, 5]
        dropped = backend.train(params, [0, 1, 2, 3], 3, PlainClient(settings))
        next(dropped)  # a round abandoned after one result and garbage-collected at once: closing it reads the
        del dropped  # replies still owed, so none is taken for the evaluation's or the next round's
        gc.collect()
        assert backend.evaluate_blocks(params, blocks) == expected
        assert [r.client_id for r in backend.train(params, [6, 7], 4, PlainClient(settings))] == [6, 7]
        process = backend._workers[0][0]
        process.kill()
        process.join()
        with pytest.raises(RuntimeError, match=r"worker 0 \(pid \d+\) died .* before its share of the evaluation"):
            backend.evaluate_blocks(params, blocks)
    finally:
        backend.close()


def test_a_multiprocess_run_logs_the_sequential_runs_metrics(tmp_path) -> None:
    """End to end on digits: the multiprocess backend (2 workers, 1 thread each) trains and evaluates with the
    sequential backend's bits (1 thread), every metric of every evaluation."""
    overrides = ["data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=10",
                 "data.min_size=5", "data.validation_fraction=0.1", "data.holdout_clients=2", "model.name=mlp",
                 "server.clients_per_round=4", "client.batch_size=16", "client.lr=0.05", "eval_every=2",
                 "rounds=4", "threads=1", "server.aggregator=gma"]
    metrics = {}
    for backend in ["sequential", "multiprocess"]:
        extra = ["backend.workers=2"] if backend == "multiprocess" else []
        run(load_config(None, [*overrides, f"backend.name={backend}", *extra]), tmp_path / backend, progress=False)
        records = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        metrics[backend] = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in records]
    assert len(metrics["sequential"]) == 2
    assert {"validation_accuracy", "holdout_worst10_accuracy"} <= set(metrics["sequential"][0])
    assert metrics["multiprocess"] == metrics["sequential"]
