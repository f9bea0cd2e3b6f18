"""Hostile replies on Flower's simulation runtime: the run finishes with the honest clients' result.

fedgma's ServerApp (:func:`fedgma.flower.server_app.serve`) runs digits with 4 clients, all sampled every
round, for 5 rounds, against a ClientApp that is fedgma's ``client_app`` except for partition 2,
which sends one hostile reply a round: (1) ``num-examples`` = 1e39; (2) finite arrays of 1e36 with
1000 examples (a weighted sum that would overflow float32); (3) a metric that is a list where the
others send a float (a valid update: it is used, the metric is left out of the aggregate); (4)
``num-steps`` = NaN; (5) an extra array. The reference experiment, in the same simulation, has
partition 2 fail (an error reply, taken as lost) in rounds 1, 2, 4, 5 and reply honestly in round
3. The two must end with the same model and the same test accuracy at every evaluation.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tomllib
import torch

pytest.importorskip("flwr")

from flower_sim import simulate  # noqa: E402  (beside this file)
from flwr.app import Array, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

from fedgma.checkpoint import load_final_model  # noqa: E402
from fedgma.config import parse_config, resolve  # noqa: E402
from fedgma.flower import client_app as fedgma_client  # noqa: E402
from fedgma.flower.run_config import EXPERIMENT_KEY  # noqa: E402
from fedgma.flower.server_app import serve  # noqa: E402

pytestmark = pytest.mark.flower

HOSTILE = 2


def config(eval_every: int):
    return resolve(parse_config({
        "seed": 2, "rounds": 5, "eval_every": eval_every, "algorithm": "fedavg", "threads": 1,
        "data": {"dataset": "digits", "num_clients": 4, "partition": {"name": "iid"}},
        "model": {"name": "mlp"}, "client": {"local_epochs": 1, "batch_size": 32, "lr": 0.05},
        "server": {"clients_per_round": 4, "aggregator": {"name": "gma"}, "on_bad_update": "drop"},
    }))


hostile_client = ClientApp()
hostile_client.query()(fedgma_client._query)  # which partition a node holds, as fedgma's own ClientApp says


@hostile_client.train()
def _train(msg, context):
    reply = fedgma_client._train(msg, context)
    metrics = reply.content["metrics"]
    metrics["extra"] = 1.0
    if int(context.node_config["partition-id"]) != HOSTILE:
        return reply
    round_index = int(msg.content["config"]["server-round"])
    # the experiment is told apart by its eval_every: 1 = hostile, 2 = reference (a test's convention)
    if tomllib.loads(str(msg.content["config"][EXPERIMENT_KEY]))["eval_every"] == 2:
        if round_index != 3:
            raise RuntimeError("the reference run's client 2 fails this round")
        return reply
    arrays = reply.content["arrays"]
    if round_index == 1:
        metrics["num-examples"] = 1e39
    elif round_index == 2:
        for key in list(arrays):
            arrays[key] = Array(np.full(arrays[key].shape, 1e36, dtype=np.float32))
        metrics["num-examples"] = 1000
    elif round_index == 3:
        metrics["extra"] = [1.0, 2.0]
    elif round_index == 4:
        metrics["num-steps"] = float("nan")
    else:
        arrays["extra.weight"] = Array(np.zeros(3, dtype=np.float32))
    reply.content["metrics"] = MetricRecord(dict(metrics))
    return reply


def test_hostile_replies_on_the_simulation_runtime_leave_the_honest_result(tmp_path):
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        serve(grid, config(1), tmp_path / "hostile")
        serve(grid, config(2), tmp_path / "reference")

    simulate(server_app, hostile_client, 4)
    rounds = [json.loads(line) for line in (tmp_path / "hostile" / "rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rounds] == [[0, 1, 3], [0, 1, 3], [0, 1, 2, 3], [0, 1, 3], [0, 1, 3]]
    reasons = [" ".join(r.get("dropped", {}).values()) for r in rounds]
    for index, needle in [(0, "weight 'num-examples'"), (1, "overflow"), (3, "num-steps"), (4, "extra.weight")]:
        assert needle in reasons[index], (index, reasons[index])
    assert not reasons[2]
    reference = [json.loads(line) for line in (tmp_path / "reference" / "rounds.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in reference] == [r["aggregated"] for r in rounds]
    hostile = load_final_model(tmp_path / "hostile" / "final_model.pt")["params"]
    honest = load_final_model(tmp_path / "reference" / "final_model.pt")["params"]
    assert torch.isfinite(hostile).all()
    torch.testing.assert_close(hostile, honest, rtol=1e-5, atol=1e-6)  # (replies may be folded in another order)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("hostile", "reference")]
    assert summaries[0]["final"]["test_accuracy"] == summaries[1]["final"]["test_accuracy"]
    assert summaries[0]["final"]["test_accuracy"] > summaries[0]["initial"]["test_accuracy"] + 0.2
