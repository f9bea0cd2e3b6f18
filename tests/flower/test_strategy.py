"""GMA as a Flower strategy, against fedgma.aggregation.gma on hand-built replies."""

from __future__ import annotations

import gc
import time
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi  # noqa: E402

from fedgma.aggregation import gma, mean  # noqa: E402
from fedgma.flower import GMAFedAdam, GMAFedAvg, InvalidReplyError, ReplyAggregator, with_gma  # noqa: E402
from fedgma.flower.strategy import StreamingGrid  # noqa: E402

pytestmark = pytest.mark.flower

SHAPES = {"fc.weight": (4, 3), "fc.bias": (4,)}


class FakeGrid:
    """Just enough of a Grid for configure_train: three connected nodes."""

    def __init__(self, nodes=(11, 12, 13)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in arrays.items()})


def reply(node: int, arrays: dict[str, np.ndarray] | ArrayRecord, weight=10, error: str | None = None,
          metrics: dict | None = None) -> Message:
    metadata = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"i{node}", group_id="1", created_at=time.time(), ttl=60.0,
                        message_type=MessageType.TRAIN)
    if error is not None:
        from flwr.app import Error

        return Message(error=Error(code=0, reason=error), metadata=metadata)
    values = {"num-examples": weight, "train_loss": 0.5} if metrics is None else metrics
    content = RecordDict({"arrays": arrays if isinstance(arrays, ArrayRecord) else record(arrays),
                          "metrics": MetricRecord(values)})
    return Message(content=content, metadata=metadata)


def random_model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    return {k: (scale * torch.randn(s, generator=g)).numpy() for k, s in SHAPES.items()}


def flat(arrays: dict[str, np.ndarray]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(np.asarray(arrays[k])).reshape(-1) for k in SHAPES])


def global_and_clients(k: int = 5, seed: int = 0):
    theta = random_model(seed)
    clients = [{key: v + random_model(100 + i, 0.1)[key] for key, v in theta.items()} for i in range(k)]
    weights = [float(w) for w in range(3, 3 + k)]
    return theta, clients, weights


def round_of(strategy, theta, clients, weights, server_round=1):
    list(strategy.configure_train(server_round, record(theta), ConfigRecord(), FakeGrid()))
    replies = [reply(20 + i, c, w) for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
    return strategy.aggregate_train(server_round, iter(replies))


def expected_gma(theta, clients, weights, **options):
    updates = [flat(c) - flat(theta) for c in clients]
    aggregate, mask = gma(updates, weights, **options)
    return flat(theta) + aggregate, mask


@pytest.mark.parametrize("threshold, hard, weighted", [(0.4, False, False), (0.8, True, False), (0.6, False, True)])
def test_gma_fedavg_matches_core_gma_exactly(threshold, hard, weighted):
    theta, clients, weights = global_and_clients(6)
    strategy = GMAFedAvg(threshold=threshold, hard=hard, weighted_agreement=weighted, fraction_evaluate=0.0)
    arrays, metrics = round_of(strategy, theta, clients, weights)
    expected, mask = expected_gma(theta, clients, weights, threshold=threshold, hard=hard, weighted_agreement=weighted)
    got = flat({k: v.numpy() for k, v in arrays.items()})
    assert torch.equal(got, expected)
    assert metrics["gma-mask-density"] == pytest.approx(float(mask.mean()), abs=1e-6)
    assert metrics["gma-num-clients"] == 6
    assert metrics["train_loss"] == pytest.approx(0.5)
    assert sum(strategy.last_round["stats"]["agreement_histogram"]) == 16


def test_threshold_zero_and_mean_rule_equal_flower_fedavg():
    theta, clients, weights = global_and_clients(4)
    flower_arrays, _ = round_of(FedAvg(fraction_evaluate=0.0), theta, clients, weights)
    for strategy in (GMAFedAvg(threshold=0.0), GMAFedAvg(aggregator="mean")):
        arrays, _ = round_of(strategy, theta, clients, weights)
        for key in SHAPES:
            np.testing.assert_allclose(arrays[key].numpy(), flower_arrays[key].numpy(), rtol=1e-5, atol=1e-6)
    # and the mean rule is fedgma's mean of the updates
    arrays, _ = round_of(GMAFedAvg(aggregator="mean"), theta, clients, weights)
    expected = flat(theta) + mean([flat(c) - flat(theta) for c in clients], weights)
    assert torch.equal(flat({k: v.numpy() for k, v in arrays.items()}), expected)


@pytest.mark.parametrize(
    "base, options",
    [
        (FedAvg, {}),
        (FedAvgM, {"server_learning_rate": 0.7, "server_momentum": 0.9}),
        (FedProx, {"proximal_mu": 0.1}),
        (FedAdam, {"eta": 0.05}),
        (FedYogi, {"eta": 0.05}),
        (FedAdagrad, {"eta": 0.05}),
    ],
)
def test_each_flower_strategy_applies_its_server_step_to_the_gma_aggregate(base, options):
    """with_gma(C) over 3 rounds == C fed one reply holding core GMA's aggregate each round."""
    combined, reference = with_gma(base)(threshold=0.5, **options), base(**options)
    assert type(combined).__name__ == f"GMA{base.__name__}"
    theta_c = theta_r = global_and_clients(1, seed=7)[0]
    for server_round in (1, 2, 3):
        _, clients, weights = global_and_clients(5, seed=server_round)
        clients = [{k: theta_c[k] + (c[k] - global_and_clients(1, seed=server_round)[0][k]) for k in SHAPES}
                   for c in clients]
        arrays_c, _ = round_of(combined, theta_c, clients, weights, server_round)
        target, _ = expected_gma(theta_r, clients, weights, threshold=0.5)
        target_arrays = {}
        start = 0
        for k, shape in SHAPES.items():
            n = int(np.prod(shape))
            target_arrays[k] = target[start : start + n].reshape(shape).numpy()
            start += n
        list(reference.configure_train(server_round, record(theta_r), ConfigRecord(), FakeGrid()))
        arrays_r, _ = reference.aggregate_train(server_round, [reply(1, target_arrays, 1)])
        for k in SHAPES:  # with_gma casts Flower's float64 (FedAdam, ...) back to the model's float32
            assert arrays_c[k].dtype == "float32"
            np.testing.assert_array_equal(arrays_c[k].numpy(), arrays_r[k].numpy().astype(np.float32))
        arrays_r = ArrayRecord({k: Array(arrays_r[k].numpy().astype(np.float32)) for k in SHAPES})
        theta_c = {k: v.numpy() for k, v in arrays_c.items()}
        theta_r = {k: v.numpy() for k, v in arrays_r.items()}
    assert any(not np.array_equal(theta_c[k], global_and_clients(1, seed=7)[0][k]) for k in SHAPES)


def test_integer_buffers_are_averaged_plainly_keep_dtype_and_bypass_the_server_step():
    theta = {**random_model(0), "bn.num_batches_tracked": np.array(100, np.int64), "flags": np.array([1, 0], np.int32)}
    clients = []
    for i, counter in enumerate([110, 112, 131]):
        c = {k: v + 0.01 * (i + 1) for k, v in random_model(0).items()}
        c["bn.num_batches_tracked"] = np.array(counter, np.int64)
        c["flags"] = np.array([1, i % 2], np.int32)
        clients.append(c)
    weights = [1.0, 1.0, 2.0]
    strategy = GMAFedAdam(eta=0.1)
    list(strategy.configure_train(1, record(theta), ConfigRecord(), FakeGrid()))
    replies = [reply(i, c, w) for i, (c, w) in enumerate(zip(clients, weights, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    counter = arrays["bn.num_batches_tracked"]
    assert counter.dtype == "int64" and counter.shape == ()
    assert int(counter.numpy()) == round((110 + 112 + 2 * 131) / 4)  # plain weighted mean, not FedAdam's step
    assert arrays["flags"].dtype == "int32"
    np.testing.assert_array_equal(arrays["flags"].numpy(), [1, 0])  # (0 + 1 + 0) / 4 rounds to 0


def _bad_replies(theta):
    good = {k: v + 0.1 for k, v in theta.items()}
    nan = {k: v.copy() for k, v in good.items()}
    nan["fc.bias"][1] = np.nan
    shape = {**good, "fc.bias": np.zeros(5, np.float32)}
    dtype = {**good, "fc.bias": good["fc.bias"].astype(np.float64)}
    missing = {"fc.weight": good["fc.weight"]}
    extra = {**good, "other": np.zeros(2, np.float32)}
    return [
        (reply(31, nan), "fc.bias' contains NaN"),
        (reply(32, shape), "shape (5,), expected (4,)"),
        (reply(33, dtype), "dtype float64, expected float32"),
        (reply(34, missing), "missing ['fc.bias']"),
        (reply(35, extra), "unexpected ['other']"),
        (reply(36, good, weight=-1), "weight 'num-examples' must be"),
        (reply(37, good, weight=float("inf")), "weight 'num-examples' must be"),
        (reply(38, good, metrics={"loss": 1.0}), "must be one finite number, got None"),
        (reply(39, good, metrics={"num-examples": [1, 2]}), "must be one finite number"),
        (reply(40, good, error="out of memory"), "out of memory"),
    ]


def test_invalid_replies_are_dropped_with_their_node_id():
    theta = random_model(1)
    good = [reply(1, {k: v + 0.2 for k, v in theta.items()}, 5), reply(2, {k: v - 0.1 for k, v in theta.items()}, 5)]
    bad = _bad_replies(theta)
    strategy = GMAFedAvg(threshold=0.0)
    list(strategy.configure_train(1, record(theta), ConfigRecord(), FakeGrid()))
    arrays, metrics = strategy.aggregate_train(1, [good[0], *[b for b, _ in bad], good[1]])
    dropped = dict(strategy.last_round["dropped"])
    assert len(dropped) == len(bad)
    for message, expected in bad:
        node = str(message.metadata.src_node_id)
        assert expected in dropped[node], (node, dropped[node])
    assert metrics["gma-num-dropped"] == len(bad)
    np.testing.assert_allclose(flat({k: v.numpy() for k, v in arrays.items()}), flat(theta) + 0.05, atol=1e-6)


@pytest.mark.parametrize("index", range(10))
def test_invalid_reply_fails_the_round_when_configured(index):
    theta = random_model(1)
    message, expected = _bad_replies(theta)[index]
    strategy = GMAFedAvg(on_invalid="fail")
    list(strategy.configure_train(1, record(theta), ConfigRecord(), FakeGrid()))
    with pytest.raises(InvalidReplyError) as info:
        strategy.aggregate_train(1, [reply(1, theta), message])
    assert f"node {message.metadata.src_node_id}" in str(info.value) and expected in str(info.value)


def test_too_few_valid_replies_leave_the_model_unchanged():
    theta = random_model(1)
    strategy = GMAFedAvg(min_replies=2)
    list(strategy.configure_train(1, record(theta), ConfigRecord(), FakeGrid()))
    assert strategy.aggregate_train(1, [reply(1, theta), reply(2, theta, error="node gone")]) == (None, None)
    assert strategy.aggregate_train(1, []) == (None, None)
    for bad in (0, 1.5, True):  # with_gma's check is FedgmaStrategy's (GMAFedAvg's): an integer ≥ 1
        for make in (GMAFedAvg, with_gma(FedAvg)):
            with pytest.raises(ValueError, match=f"min_replies must be an integer ≥ 1, got {bad!r}"):
                make(min_replies=bad)
    with pytest.raises(ValueError, match="on_invalid"):
        with_gma(FedAvg)(on_invalid="ignore")
    with pytest.raises(ValueError, match="on_invalid"):
        GMAFedAvg(on_invalid="ignore")
    with pytest.raises(ValueError, match="threshold"):
        GMAFedAvg(threshold=1.5)
    with pytest.raises(ValueError, match="unknown aggregator"):
        GMAFedAvg(aggregator="gmaa")
    with pytest.raises(TypeError, match="FedAvg"):
        with_gma(dict)


def test_replies_are_folded_one_at_a_time_and_not_kept():
    """Streaming: when reply k+1 is produced, reply k (and its model) is already garbage."""
    theta = random_model(2)
    strategy = GMAFedAvg()
    list(strategy.configure_train(1, record(theta), ConfigRecord(), FakeGrid()))
    alive: list[weakref.ref] = []

    def replies():
        for i in range(6):
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier reply is still referenced"
            message = reply(i, {k: v + 0.01 * (i - 2.5) for k, v in theta.items()}, 3)
            alive.append(weakref.ref(message))
            alive.append(weakref.ref(message.content["arrays"]))
            yield message
            del message

    arrays, _ = strategy.aggregate_train(1, replies())
    assert arrays is not None and len(alive) == 12


def test_reply_aggregator_rejects_unsupported_global_models():
    with pytest.raises(ValueError, match="empty"):
        ReplyAggregator(ArrayRecord())
    with pytest.raises(ValueError, match="complex64 is not supported"):
        ReplyAggregator(record({"z": np.zeros(2, np.complex64)}))


class PullGrid:
    """A grid whose replies arrive two per pull; one message is never answered."""

    def __init__(self) -> None:
        self.pushed: list[str] = []
        self.pulls = 0

    def push_messages(self, messages):
        self.pushed = [f"id{i}" for i, _ in enumerate(messages)]
        return list(self.pushed)

    def pull_messages(self, ids):
        self.pulls += 1
        ready = sorted(i for i in ids if i != "id4")[:2]
        out = []
        for message_id in ready:
            m = reply(int(message_id[2:]), random_model(0), 1)
            m.metadata.__dict__["_reply_to_message_id"] = message_id
            out.append(m)
        return out

    def get_node_ids(self):
        return [1]


def test_streaming_grid_yields_replies_as_they_arrive_and_honours_the_timeout():
    grid = PullGrid()
    stream = StreamingGrid(grid, pull_interval=0.01)
    start = time.monotonic()
    replies = stream.send_and_receive([object()] * 5, timeout=0.2)
    assert grid.pushed == ["id0", "id1", "id2", "id3", "id4"]  # pushed eagerly
    first = next(iter(replies))
    assert grid.pulls == 1 and first.metadata.src_node_id == 0
    rest = list(replies)
    assert [m.metadata.src_node_id for m in rest] == [1, 2, 3]
    assert 0.15 < time.monotonic() - start < 5
    assert stream.get_node_ids() == [1]  # delegated
