"""Flower's own serverapp strategy tests (flwr 1.41: fedavgm_test.py, fedopt_test.py), adapted to fedgma's strategies.

Ported from ``framework/py/flwr/serverapp/strategy/{fedavgm,fedopt}_test.py`` of adap/flower
(Apache-2.0, Copyright 2025 Flower Labs GmbH) and run against :class:`FedgmaStrategy` with the
``mean`` rule and with GMA at τ = 0 (every mask entry 1: GMA is then the weighted mean), the
``GMAFedAvgM`` alias, and ``with_gma(FedAvgM)`` (Flower's own step) at τ = 0. The replies are made
as Flower's ``create_mock_reply`` makes them (a ``Mock(spec=Message)``). Where fedgma's behaviour
differs by design, the adaptation says so: a reply whose arrays do not match the global model is
dropped (or fails the round under ``on_invalid="fail"``), where Flower raises AggregationError.
"""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAvgM  # noqa: E402

from fedgma.flower import FedgmaStrategy, GMAFedAvgM, InvalidReplyError, with_gma  # noqa: E402

pytestmark = pytest.mark.flower


def create_mock_reply(arrays: ArrayRecord, num_examples: float) -> Message:
    """Flower's strategy_utils_test.create_mock_reply."""
    message = Mock(spec=Message)
    message.content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": num_examples})})
    message.has_error.side_effect = lambda: False
    message.has_content.side_effect = lambda: True
    return message


def mean_strategy(lr: float, momentum: float = 0.0):
    return FedgmaStrategy(aggregator="mean", optimizer="sgd", optimizer_options={"lr": lr, "momentum": momentum})


def gma_tau0_strategy(lr: float, momentum: float = 0.0):
    return FedgmaStrategy(aggregator="gma", aggregator_options={"threshold": 0.0}, optimizer="sgd",
                          optimizer_options={"lr": lr, "momentum": momentum})


def alias_strategy(lr: float, momentum: float = 0.0):
    return GMAFedAvgM(threshold=0.0, server_learning_rate=lr, server_momentum=momentum)


def flower_step_strategy(lr: float, momentum: float = 0.0):
    return with_gma(FedAvgM)(threshold=0.0, server_learning_rate=lr, server_momentum=momentum)


MAKERS = pytest.mark.parametrize("make", [mean_strategy, gma_tau0_strategy, alias_strategy, flower_step_strategy],
                                 ids=["mean", "gma-tau0", "GMAFedAvgM", "with_gma(FedAvgM)"])


# ------------------------------------------------------------------------ fedavgm_test.py


def _prepare(make, lr: float, momentum: float = 0.0):
    """Flower's _prepare_strategy: two clients, weights 1 and 2, from a zero model."""
    weights0_0 = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    weights0_1 = np.array([7, 8, 9, 10], dtype=np.float32)
    weights1_0 = np.array([[29, 23, 19], [17, 13, 11]], dtype=np.float32)
    weights1_1 = np.array([7, 5, 3, 2], dtype=np.float32)
    replies = [
        create_mock_reply(ArrayRecord([weights0_0, weights0_1]), num_examples=1),
        create_mock_reply(ArrayRecord([weights1_0, weights1_1]), num_examples=2),
    ]
    expected = [(weights0_0 * 1 + weights1_0 * 2) / 3, (weights0_1 * 1 + weights1_1 * 2) / 3]
    initial = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    strategy = make(lr, momentum)
    strategy.current_arrays = ArrayRecord(initial)
    return strategy, replies, expected


@MAKERS
def test_aggregate_fit_using_near_one_server_lr_and_no_momentum(make):
    strategy, replies, expected = _prepare(make, 1.0 + 1e-9)
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    for w_act, w_exp in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        assert w_act.dtype == np.float32  # (fedgma: every array keeps its dtype)
        np.testing.assert_almost_equal(w_act, w_exp, decimal=5)


@MAKERS
def test_aggregate_fit_server_learning_rate_and_momentum(make):
    strategy, replies, expected = _prepare(make, 1.0 + 1e-9, 1e-9)
    actual, _ = strategy.aggregate_train(1, replies)  # first round (activate momentum)
    actual, _ = strategy.aggregate_train(2, replies)  # second round (update momentum)
    assert actual is not None
    for w_act, w_exp in zip(actual.to_numpy_ndarrays(), expected, strict=True):
        np.testing.assert_almost_equal(w_act, w_exp, decimal=5)


@MAKERS
def test_aggregate_fit_with_scalar_weights(make):
    strategy = make(1.0 + 1e-9)
    strategy.current_arrays = ArrayRecord([np.array(0.0)])
    replies = [
        create_mock_reply(ArrayRecord([np.array(1.0)]), num_examples=1),
        create_mock_reply(ArrayRecord([np.array(3.0)]), num_examples=2),
    ]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    scalar_weight = actual.to_numpy_ndarrays()[0]
    assert scalar_weight.shape == ()
    np.testing.assert_allclose(scalar_weight, np.array(7.0 / 3.0), rtol=1e-6)


# ------------------------------------------------------------------------ fedopt_test.py

OPTIMIZERS = ["adagrad", "adam", "yogi"]  # Flower's FedAdagrad, FedAdam, FedYogi (fedgma's Reddi et al. maths)


@pytest.mark.parametrize("is_valid, reply", [
    (True, [np.random.randn(7, 3) for _ in range(4)]),   # same keys and shapes
    (False, [np.random.randn(7, 3) for _ in range(5)]),  # keys do not match
    (False, [np.random.randn(7, 5) for _ in range(4)]),  # keys match, shapes differ
])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_compute_deltat_refuses_a_mismatched_reply(is_valid, reply, optimizer):
    """Flower raises AggregationError; fedgma drops the reply (the round changes nothing) or fails under "fail"."""
    global_arrays = ArrayRecord([np.random.randn(7, 3) for _ in range(4)])
    for on_invalid in ("drop", "fail"):
        strategy = FedgmaStrategy(aggregator="gma", aggregator_options={"threshold": 0.0}, optimizer=optimizer,
                                  on_invalid=on_invalid)
        strategy.current_arrays = global_arrays
        replies = [create_mock_reply(ArrayRecord(reply), num_examples=1)]
        if is_valid:
            arrays, _ = strategy.aggregate_train(1, replies)
            assert arrays is not None and list(arrays) == list(global_arrays)
        elif on_invalid == "drop":
            assert strategy.aggregate_train(1, replies) == (None, None)
            assert strategy.last_round["dropped"] and "array" in strategy.last_round["dropped"][0][1]
        else:
            with pytest.raises(InvalidReplyError, match="array"):
                strategy.aggregate_train(1, replies)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("aggregator, options", [("mean", {}), ("gma", {"threshold": 0.0})])
def test_fedopt_strategies_aggregate_scalar_arrays(optimizer, aggregator, options):
    strategy = FedgmaStrategy(aggregator=aggregator, aggregator_options=options, optimizer=optimizer)
    strategy.current_arrays = ArrayRecord([np.array(0.0)])
    replies = [
        create_mock_reply(ArrayRecord([np.array(1.0)]), num_examples=1),
        create_mock_reply(ArrayRecord([np.array(3.0)]), num_examples=2),
    ]
    actual, _ = strategy.aggregate_train(1, replies)
    assert actual is not None
    scalar_weight = actual.to_numpy_ndarrays()[0]
    assert scalar_weight.shape == ()
    assert np.isfinite(scalar_weight)
    # (beyond Flower's test) fedgma's first adaptive step: θ = 0 + lr · m / (sqrt(v) + τ) with m, v from
    # Δ = 7/3; every one of the three moves θ up by less than lr = 0.01 · (1 + 1e-6)
    assert 0 < float(scalar_weight) <= 0.01 * (1 + 1e-6)
