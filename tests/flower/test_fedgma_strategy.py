"""FedgmaStrategy: fedgma's parts as one Flower strategy; dtypes, hostile replies, Flower's contracts."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import (  # noqa: E402
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    QFedAvg,
)

from fedgma.aggregation import mean  # noqa: E402
from fedgma.flower import (  # noqa: E402
    FedgmaStrategy,
    GMAFedAdagrad,
    GMAFedAdam,
    GMAFedAvg,
    GMAFedAvgM,
    GMAFedProx,
    GMAFedYogi,
    InvalidReplyError,
    with_gma,
)
from fedgma.server_opt import make_server_optimizer  # noqa: E402

pytestmark = pytest.mark.flower

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,)}


class FakeGrid:
    def __init__(self, nodes=(11, 12, 13)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def reply(node: int, arrays: dict[str, np.ndarray], metrics: dict | None = None, weight=10) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"i{node}", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type=MessageType.TRAIN)
    values = {"num-examples": weight, "train_loss": 0.5} if metrics is None else metrics
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(values)}), metadata=metadata)


def model(seed: int, dtype=np.float32, scale: float = 1.0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=g, dtype=torch.float64)).numpy().astype(dtype)
            for k, s in SHAPES.items()}


def flat(arrays) -> torch.Tensor:
    def values(a):
        return a.numpy() if isinstance(a, Array) else a

    return torch.cat([torch.from_numpy(np.asarray(values(arrays[k]), dtype=np.float64)).reshape(-1) for k in SHAPES])


def run_round(strategy, theta, clients, weights, server_round=1):
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in theta.items()})
    list(strategy.configure_train(server_round, record, ConfigRecord(), FakeGrid()))
    replies = [reply(20 + i, c, weight=w) for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
    return strategy.aggregate_train(server_round, iter(replies))


FLOWER_CLASSES = [FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad]
OURS = [FedgmaStrategy, GMAFedAvg, GMAFedAvgM, GMAFedProx, GMAFedAdam, GMAFedYogi, GMAFedAdagrad]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("make", [*(lambda c=c: with_gma(c)(threshold=0.3) for c in FLOWER_CLASSES),
                                  *(lambda c=c: c(threshold=0.3) if c is not FedgmaStrategy
                                    else c(aggregator_options={"threshold": 0.3}) for c in OURS)],
                         ids=[f"with_gma({c.__name__})" for c in FLOWER_CLASSES] + [c.__name__ for c in OURS])
def test_every_path_keeps_each_arrays_dtype_in_every_round(make, dtype):
    """Over 4 rounds each reply, made in the global model's dtype, is accepted and the model keeps its dtype."""
    strategy = make()
    theta = model(0, dtype)
    for server_round in range(1, 5):
        clients = [{k: (v.astype(np.float64) + model(10 * server_round + i, np.float64, 0.01)[k]).astype(dtype)
                    for k, v in theta.items()} for i in range(3)]
        arrays, _ = run_round(strategy, theta, clients, [3, 4, 5], server_round)
        assert arrays is not None, f"round {server_round}: the model was left unchanged"
        assert not getattr(strategy, "last_round", {}).get("dropped"), strategy.last_round["dropped"]
        for k in SHAPES:
            assert arrays[k].dtype == str(np.dtype(dtype)), (k, arrays[k].dtype)
            assert np.isfinite(arrays[k].numpy()).all()
        new = {k: arrays[k].numpy() for k in SHAPES}
        assert any(not np.array_equal(new[k], theta[k]) for k in SHAPES)
        theta = new


@pytest.mark.parametrize("cls", [FedMedian, FedTrimmedAvg, Krum, Bulyan, QFedAvg, dict])
def test_with_gma_refuses_strategies_that_aggregate_their_own_way(cls):
    with pytest.raises(TypeError, match="FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad"):
        with_gma(cls)


def test_a_subclass_of_a_supported_flower_strategy_is_accepted():
    class MyAdam(FedAdam):
        pass

    assert issubclass(with_gma(MyAdam), MyAdam)


@pytest.mark.parametrize("alias, name, options", [
    (GMAFedAvg, "sgd", {}), (GMAFedAvgM, "sgd", {"momentum": 0.9}), (GMAFedAdam, "adam", {"lr": 0.05}),
    (GMAFedYogi, "yogi", {"lr": 0.05}), (GMAFedAdagrad, "adagrad", {"lr": 0.05, "eps": 0.01}),
])
def test_aliases_use_fedgmas_server_optimizer_maths(alias, name, options):
    """τ = 0 (mask of ones): the aggregate is the weighted mean; the step is fedgma's optimizer, bit for bit."""
    flower_names = {"lr": "eta", "momentum": "server_momentum", "eps": "tau"}
    strategy = alias(threshold=0.0, **{flower_names[k]: v for k, v in options.items()})
    reference = make_server_optimizer(name, **options)
    theta = model(0)
    params = flat(theta).float()
    for server_round in (1, 2, 3):
        clients = [{k: v + model(10 * server_round + i, np.float32, 0.1)[k] for k, v in theta.items()}
                   for i in range(3)]
        arrays, _ = run_round(strategy, theta, clients, [2, 3, 4], server_round)
        updates = [flat(c).float() - params for c in clients]
        params = reference.step(params, -mean(updates, [2.0, 3.0, 4.0]))
        theta = {k: arrays[k].numpy() for k in SHAPES}
        assert torch.equal(flat(theta).float(), params), server_round


def test_options_are_checked_at_construction():
    from fedgma.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="threshhold|threshold"):
        FedgmaStrategy(aggregator_options={"threshhold": 0.4})
    with pytest.raises((ConfigError, ValueError), match="adamw"):
        FedgmaStrategy(optimizer="adamw")
    with pytest.raises(ValueError, match="on_invalid"):
        FedgmaStrategy(on_invalid="ignore")


# --------------------------------------------------------------------------------------------
# Hostile replies, by hand (fast): each is dropped naming its node, the result is the honest one
# --------------------------------------------------------------------------------------------


def hostile_replies(theta):
    huge = {k: np.full(v.shape, 1e36, np.float32) for k, v in theta.items()}
    return {
        90: reply(90, model(5), {"num-examples": 1e39, "train_loss": 0.5}),
        91: reply(91, huge, {"num-examples": 1000, "train_loss": 0.5}),
        92: reply(92, model(6), {"num-examples": 10, "train_loss": 0.5, "num-steps": float("nan")}),
        93: reply(93, {**model(7), "extra": np.zeros(2, np.float32)}),
        94: reply(94, {"fc.weight": model(8)["fc.weight"]}),
        95: reply(95, {k: v.astype(np.float64) for k, v in model(9).items()}),
        96: reply(96, model(10), {"num-examples": [1.0, 2.0], "train_loss": 0.5}),
        97: reply(97, {"fc.weight": model(11)["fc.weight"], "fc.bias": np.zeros(5, np.float32)}),
    }


@pytest.mark.parametrize("aggregator", ["mean", "gma", "median", "trimmed_mean", "krum"])
def test_hostile_replies_are_dropped_naming_the_node_and_the_honest_result_stands(aggregator, caplog):
    theta = model(0)
    honest = [{k: v + model(100 + i, np.float32, 0.1)[k] for k, v in theta.items()} for i in range(6)]
    options = {"krum": {"num_byzantine": 1}}.get(aggregator, {})
    record = ArrayRecord({k: Array(v) for k, v in theta.items()})

    def strategy_round(replies):
        strategy = FedgmaStrategy(aggregator=aggregator, aggregator_options=options)
        list(strategy.configure_train(1, record, ConfigRecord(), FakeGrid()))
        return strategy, strategy.aggregate_train(1, iter(replies))

    _, (expected, _) = strategy_round([reply(20 + i, c) for i, c in enumerate(honest)])
    bad = hostile_replies(theta)
    mixed = [reply(20 + i, c) for i, c in enumerate(honest)]
    for position, message in enumerate(bad.values()):
        mixed.insert(2 * position % len(mixed), message)
    # a metric that is a list for one honest client and a float for the others
    mixed.append(reply(30, honest[0], {"num-examples": 10, "train_loss": 0.5, "acc": [0.1, 0.2]}))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        strategy, (arrays, metrics) = strategy_round(mixed)
    dropped = dict(strategy.last_round["dropped"])
    assert sorted(int(n) for n in dropped) == sorted(bad), dropped
    for node in bad:
        assert f"node {node}" in caplog.text
    assert arrays is not None and metrics is not None
    if aggregator in ("median", "krum"):  # one more honest reply changes a robust rule's pick; still honest-sized
        assert float((flat(arrays) - flat(theta)).abs().max()) < 1.0
    else:
        extra = FedgmaStrategy(aggregator=aggregator, aggregator_options=options)
        list(extra.configure_train(1, record, ConfigRecord(), FakeGrid()))
        expected, _ = extra.aggregate_train(1, iter([reply(20 + i, c) for i, c in enumerate(honest)]
                                                    + [reply(30, honest[0])]))
        assert torch.equal(flat(arrays), flat(expected))


def test_on_invalid_fail_raises_naming_the_node():
    theta = model(0)
    strategy = FedgmaStrategy(on_invalid="fail")
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in theta.items()}), ConfigRecord(), FakeGrid()))
    with pytest.raises(InvalidReplyError, match="node 90"):
        strategy.aggregate_train(1, iter([reply(20, theta), hostile_replies(theta)[90]]))


# --------------------------------------------------------------------------------------------
# Flower's contracts: what the metric functions receive
# --------------------------------------------------------------------------------------------


def test_train_metrics_fn_receives_each_replys_own_records():
    seen = []

    def fn(records, key):
        seen.append((key, [sorted(r.metric_records) for r in records]))
        return MetricRecord({"n": float(sum(r["my-metrics"][key] for r in records))})

    theta = model(0)
    strategy = FedgmaStrategy(train_metrics_aggr_fn=fn)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in theta.items()}), ConfigRecord(), FakeGrid()))
    replies = []
    for i, w in enumerate((3, 5)):
        message = reply(20 + i, theta, weight=w)
        content = RecordDict({"arrays": message.content["arrays"],
                              "my-metrics": MetricRecord({"num-examples": w, "train_loss": 0.1})})
        replies.append(Message(content=content, metadata=message.metadata))
    _, metrics = strategy.aggregate_train(1, iter(replies))
    assert seen == [("num-examples", [["my-metrics"], ["my-metrics"]])]
    assert metrics["n"] == 8.0


def test_a_failing_metrics_fn_is_a_warning_not_the_end_of_the_run(caplog):
    def fn(records, key):
        raise KeyError("metrics")

    theta = model(0)
    strategy = FedgmaStrategy(train_metrics_aggr_fn=fn)
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in theta.items()}), ConfigRecord(), FakeGrid()))
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, metrics = strategy.aggregate_train(1, iter([reply(20, theta)]))
    assert arrays is not None and metrics is None and "KeyError" in caplog.text


def test_from_config_takes_every_server_part():
    from fedgma.config import ConfigError, parse_config, resolve

    config = resolve(parse_config({
        "algorithm": "fedadam", "data": {"dataset": "digits"},
        "server": {"aggregator": {"name": "trimmed_mean", "trim_fraction": 0.2}, "max_update_norm": 5.0,
                   "clip_norm": 3.0, "min_clients": 2, "on_bad_update": "drop"},
    }))
    strategy = FedgmaStrategy.from_config(config, min_train_nodes=1)
    assert (strategy.aggregator, strategy.aggregator_options, strategy.optimizer) == (
        "trimmed_mean", {"trim_fraction": 0.2}, "adam")
    assert (strategy.max_update_norm, strategy.clip_norm, strategy.min_replies, strategy.on_invalid) == (
        5.0, 3.0, 2, "drop")
    with pytest.raises(ConfigError, match="scaffold"):
        FedgmaStrategy.from_config(resolve(parse_config({"algorithm": "scaffold", "data": {"dataset": "digits"}})))
