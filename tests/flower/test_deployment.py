"""A Flower deployment on loopback: SuperLink + 3 SuperNodes with TLS and node auth, one SuperNode killed mid-round.

The fast tests pin down why a killed SuperNode used to stop the run: the SuperLink answers the
server for a node that stopped sending heartbeats with an error reply of its own (code
NODE_UNAVAILABLE, sender = the SuperLink), and the strategy, run by the app with
``on_invalid="fail"`` (fedgma's ``server.on_bad_update`` default), took that reply for a bad update
and raised, which ended the ServerApp. A reply that never came is now *lost*, not bad.

The slow tests are deployments: the first one with the kill (about 2 minutes on 2 cores, most of it
waiting for the SuperLink to notice the dead node: 2 × the 30 s heartbeat interval after its last
heartbeat); the second one runs examples/flower-app/secure (GMA under SecAgg+, ``secure-aggregation =
true``) on the same TLS + node-auth deployment (each SecAgg+ round is 4 messages per node, each run
in a ClientApp process of its own, so a round takes several times a plaintext one).
Run it with::

    .venv/bin/pytest tests/flower/test_deployment.py -m slow -q
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode  # noqa: E402
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message  # noqa: E402

from fedgma.flower import GMAFedAvg, InvalidReplyError  # noqa: E402
from fedgma.flower.strategy import StreamingGrid  # noqa: E402

pytestmark = pytest.mark.flower

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app"
sys.path.insert(0, str(APP))  # the deployment helper is the example's loopback.py
from loopback import LoopbackDeployment, write_node_key  # noqa: E402

SHAPES = {"fc.weight": (3, 2), "fc.bias": (3,)}


# --------------------------------------------------------------------------------------------
# The cause, without processes: a SuperLink-made "node unavailable" reply
# --------------------------------------------------------------------------------------------


class LinkGrid:
    """A Grid that behaves as flwr's SuperLink does for nodes that are alive, gone, or silent.

    ``replies[node]`` is what that node does with the message it is sent: ``"reply"`` (answers
    with the model + 0.1), ``"gone"`` (the SuperLink answers with the NODE_UNAVAILABLE error reply,
    made by flwr's own function for it), ``"crash"`` (the ClientApp raised: error code 2), or
    ``"silent"`` (nothing, ever).
    """

    def __init__(self, replies: dict[int, str]) -> None:
        self.replies = replies
        self.sent: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.replies)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as HttpGrid.push_messages does
            self.sent[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out = []
        for message_id in list(ids):
            message = self.sent[message_id]
            behaviour = self.replies[message.metadata.dst_node_id]
            if behaviour == "reply":
                arrays = ArrayRecord({k: Array(v.numpy() + 0.1) for k, v in message.content["arrays"].items()})
                out.append(Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}),
                                   reply_to=message))
            elif behaviour == "crash":
                from flwr.app import Error

                out.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="boom"), reply_to=message))
            elif behaviour == "gone":
                out.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
        return out


def _model() -> ArrayRecord:
    return ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


def _one_round(grid: LinkGrid, timeout: float = 10.0, **options):
    strategy = GMAFedAvg(threshold=0.0, fraction_evaluate=0.0, pull_interval=0.01, max_pull_interval=0.02,
                         **options)
    result = strategy.start(grid, _model(), num_rounds=1, timeout=timeout)
    return strategy, result


def test_a_node_that_vanished_mid_round_is_lost_not_a_bad_reply():
    """Under on_invalid="fail" (the app's default), the SuperLink's NODE_UNAVAILABLE reply used to raise."""
    grid = LinkGrid({11: "reply", 12: "reply", 13: "gone"})
    start = time.monotonic()
    strategy, result = _one_round(grid, on_invalid="fail", min_replies=2)
    assert time.monotonic() - start < 5  # the error reply ends the wait: no timeout involved
    lost = dict(strategy.last_round["lost"])
    assert list(lost) == ["13"]  # the node the message went to, not the SuperLink that answered for it
    assert f"code {ErrorCode.NODE_UNAVAILABLE}" in lost["13"] and "heartbeat" in lost["13"]
    assert strategy.last_round["dropped"] == []
    for key, shape in SHAPES.items():  # the round completed with the two replies: θ + 0.1
        np.testing.assert_allclose(result.arrays[key].numpy(), np.full(shape, 0.1, np.float32), atol=1e-6)
    assert result.train_metrics_clientapp[1]["gma-num-lost"] == 1
    assert SUPERLINK_NODE_ID == 1  # the error reply's sender, which the old code named as the culprit


def test_too_few_replies_after_a_loss_leave_the_model_unchanged_and_a_crash_still_fails():
    strategy, result = _one_round(LinkGrid({11: "reply", 12: "gone", 13: "gone"}), on_invalid="fail", min_replies=2)
    assert sorted(dict(strategy.last_round["lost"])) == ["12", "13"]
    assert 1 not in result.train_metrics_clientapp  # the round was skipped, the run went on
    with pytest.raises(InvalidReplyError, match="node 12: the client reported an error .*boom"):
        _one_round(LinkGrid({11: "reply", 12: "crash"}), on_invalid="fail")  # a ClientApp that raised is bad
    strategy, _ = _one_round(LinkGrid({11: "reply", 12: "crash"}), on_invalid="drop")
    assert [node for node, _ in strategy.last_round["dropped"]] == ["12"] and strategy.last_round["lost"] == []


def test_a_silent_node_is_lost_at_the_round_timeout():
    start = time.monotonic()
    strategy, result = _one_round(LinkGrid({11: "reply", 12: "reply", 13: "silent"}), timeout=0.3, min_replies=2)
    assert 0.25 < time.monotonic() - start < 5
    assert strategy.last_round["lost"] == [("13", "no reply before the round's timeout")]
    np.testing.assert_allclose(result.arrays["fc.bias"].numpy(), np.full(3, 0.1, np.float32), atol=1e-6)


def test_streaming_grid_backs_off_between_empty_pulls():
    class Empty:
        pulls = 0

        def push_messages(self, messages):
            return ["a"]

        def pull_messages(self, ids):
            self.pulls += 1
            return []

    grid = Empty()
    stream = StreamingGrid(grid, pull_interval=0.01, max_pull_interval=0.08)
    message = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type=MessageType.QUERY)
    assert list(stream.send_and_receive([message], timeout=0.6)) == []
    assert stream.destinations == {"a": 7} and stream.unanswered == [7]
    assert 7 <= grid.pulls <= 14  # 0.01, 0.02, 0.04, then every 0.08 s: ~10 pulls, not 60
    with pytest.raises(ValueError, match="pull_interval"):
        StreamingGrid(grid, pull_interval=0.5, max_pull_interval=0.1)
    with pytest.raises(ValueError, match="pull_interval"):
        GMAFedAvg(pull_interval=0.0)


# --------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------


def _wait_until(condition, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def _wait(deployment: LoopbackDeployment, run_id: int, done, what: str, timeout: float, watch: list[str]):
    """Poll ``done()`` until true; fail at once if a watched process exits or the ServerApp has ended."""
    deadline = time.monotonic() + timeout
    while not (result := done()):
        deployment.check_alive(*watch)
        if "Finished task" in deployment.log("superlink"):  # the ServerApp process ended
            time.sleep(1.0)
            if result := done():
                return result
            pytest.fail(f"the ServerApp ended before {what}:\n{deployment.run_log(run_id)[-6000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{deployment.run_log(run_id)[-6000:]}")
        time.sleep(0.2)
    return result


def _start_three_nodes_and_an_intruder(dep: LoopbackDeployment, tmp_path) -> None:
    """A TLS SuperLink, three registered SuperNodes (clients 0-2) and one whose key was never registered.

    Node authentication must refuse the intruder: if it were let in, the ServerApp would find two nodes
    claiming client 0 and stop. Returns once the three registered nodes are active.
    """
    dep.start_superlink()
    assert f"Uvicorn running on https://{dep.address}" in dep.log("superlink")  # TLS on
    for k in range(3):
        dep.register_node(f"node{k}")
        dep.start_node(f"node{k}", node_config=f"partition-id={k} num-partitions=3")
    intruder_key, _ = write_node_key(tmp_path / "deployment" / "keys", "intruder")
    dep.start_node("intruder", node_config="partition-id=0 num-partitions=3", private_key=intruder_key,
                   extra=["--max-retries", "2", "--max-wait-time", "20"])
    dep.wait_for_nodes(3)


@pytest.mark.slow
def test_deployment_with_tls_and_node_auth_survives_a_supernode_killed_mid_round(tmp_path):
    run_dir = tmp_path / "run"
    run_config = (
        "rounds=4 eval_every=1 data.num_clients=3 server.clients_per_round=3 server.min_clients=2 "
        f"round-timeout=150.0 run-dir='{run_dir}'"
    )
    with LoopbackDeployment(tmp_path / "deployment") as dep:
        _start_three_nodes_and_an_intruder(dep, tmp_path)
        intruder = dep.processes["intruder"]
        _wait_until(lambda: intruder.poll() is not None, "the intruder SuperNode to give up", 60)
        assert intruder.returncode != 0 and "Failed to activate SuperNode" in dep.log("intruder")
        assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in dep.log("superlink")  # refused: unknown key
        run_id = dep.run_app(APP, run_config)
        nodes = ["superlink", "node0", "node1", "node2"]

        # kill node 2 once it has taken round 2's train message and started its ClientApp on it
        in_flight = re.compile(
            r"ROUND 2\][^\n]*\n[^\n]*Receiving: train message.*?Start `flwr-clientapp` process", re.S
        )
        _wait(dep, run_id, lambda: in_flight.search(dep.log("node2")), "round 2 reaching node 2", 240, nodes)
        assert not (run_dir / "summary.json").exists()
        assert len((run_dir / "rounds.jsonl").read_text().splitlines()) == 1  # round 2 is under way
        dep.kill("node2", signal.SIGKILL)
        killed_at = time.monotonic()

        summary_path = run_dir / "summary.json"
        _wait(dep, run_id, summary_path.is_file, "summary.json", 300, ["superlink", "node0", "node1"])
        finished_after_kill = time.monotonic() - killed_at
        activated = dep.wait_for_nodes(3)
        server_log = dep.run_log(run_id)

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(summary_path.read_text())
    print(f"\nrun finished {finished_after_kill:.1f} s after the kill; round seconds "
          f"{[round(r['round_s'], 1) for r in rounds]}; test accuracy {summary['initial']['test_accuracy']:.4f} -> "
          f"{[round(m['test_accuracy'], 4) for m in metrics]}")

    assert len(set(activated)) == 3, "the unregistered node was activated"
    assert "both hold client" not in server_log and "3 clients mapped to SuperNodes" in server_log
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["aggregated"] == [0, 1, 2]
    # round 2: node 2 died holding its message; the SuperLink's NODE_UNAVAILABLE reply ended the wait
    # (well before round-timeout) and the round was aggregated from the two others (min_clients = 2)
    assert rounds[1]["aggregated"] == [0, 1] and list(rounds[1]["lost"]) == ["2"]
    assert f"code {ErrorCode.NODE_UNAVAILABLE}" in rounds[1]["lost"]["2"]
    assert "skipped" not in rounds[1] and rounds[1]["round_s"] < 150
    for later in rounds[2:]:  # the SuperLink lists node 2 as offline now: it is not sent anything
        assert later["unreachable"] == [2] and later["aggregated"] == [0, 1] and "lost" not in later
    assert summary["status"] == "finished" and summary["engine"] == "flower"
    final = torch.load(run_dir / "final_model.pt")["params"]
    assert bool(torch.isfinite(final).all())
    assert summary["final"]["round"] == 4
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.1


@pytest.mark.slow
def test_secure_gma_deployment_with_tls_and_node_auth(tmp_path):
    """examples/flower-app/secure (secure-aggregation = true) on SuperLink + 3 SuperNodes, TLS and node
    authentication on: every round's update goes through SecAgg+, and an unregistered node is refused."""
    run_dir = tmp_path / "run"
    run_config = (
        "rounds=2 eval_every=1 data.num_clients=3 server.clients_per_round=3 server.min_clients=2 "
        f"round-timeout=120.0 run-dir='{run_dir}'"
    )
    started = time.monotonic()
    with LoopbackDeployment(tmp_path / "deployment") as dep:
        _start_three_nodes_and_an_intruder(dep, tmp_path)
        run_id = dep.run_app(APP / "secure", run_config)
        summary_path = run_dir / "summary.json"
        _wait(dep, run_id, summary_path.is_file, "summary.json", 240, ["superlink", "node0", "node1", "node2"])
        intruder = dep.processes["intruder"]
        _wait_until(lambda: intruder.poll() is not None, "the intruder SuperNode to give up", 60)
        activated = dep.wait_for_nodes(3)
        server_log = dep.run_log(run_id)
        intruder_log, superlink_log = dep.log("intruder"), dep.log("superlink")

    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads(summary_path.read_text())
    print(f"\nsecure deployment: {time.monotonic() - started:.1f} s in all; round seconds "
          f"{[round(r['round_s'], 1) for r in rounds]}; test accuracy {summary['initial']['test_accuracy']:.4f} -> "
          f"{[round(m['test_accuracy'], 4) for m in metrics]}")

    # node authentication: the unregistered key was refused (had it got in, two nodes would claim client 0)
    assert intruder.returncode != 0 and "Failed to activate SuperNode" in intruder_log
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in superlink_log
    assert len(set(activated)) == 3 and "3 clients mapped to SuperNodes" in server_log
    assert "both hold client" not in server_log
    # every round went through SecAgg+ with all three clients, and the model learned
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["secure_aggregation"] is True and "skipped" not in r, r
        assert r["secure_num_clients"] == 3 and r["secure_num_dropped"] == 0 and r["aggregated"] == [0, 1, 2]
        assert "train_loss" not in r  # nothing of a client's training in clear
    assert summary["status"] == "finished" and summary["engine"] == "flower"
    assert summary["secure_aggregation"]["update_bound"] == 1.0
    assert summary["final"]["round"] == 2
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.1
