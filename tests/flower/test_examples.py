"""The example of docs/FLOWER.md (examples/flower-app/strategy): your own ServerApp + ClientApp with FedgmaStrategy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("flwr")

from flower_sim import simulate  # noqa: E402  (beside this file)

pytestmark = pytest.mark.flower

APP = Path(__file__).resolve().parents[2] / "examples" / "flower-app" / "strategy"


def load_example():
    spec = importlib.util.spec_from_file_location("strategy_app", APP / "strategy_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_strategy_app_learns_on_flowers_simulation_runtime():
    """docs/FLOWER.md's app as written, its pyproject's run config: GMA + fedgma's adam, 5 SuperNodes, 3 rounds."""
    app = load_example()
    run_config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    context = simulate(app.server_app, app.client_app, num_supernodes=5, run_config=run_config)
    accuracy = context.state["accuracy"]
    assert list(accuracy) == ["0", "1", "2", "3"]  # the initial model, then every round
    assert accuracy["0"] < 0.2  # an untrained 10-class model
    assert accuracy["0"] < accuracy["1"] < accuracy["2"] < accuracy["3"], dict(accuracy)  # measured .057 .219 .596 .697
    assert accuracy["3"] > 0.6


SECURE_APP = APP.parent / "secure"


def test_the_secure_example_app_runs_gma_under_secagg_on_flowers_simulation_runtime(tmp_path):
    """examples/flower-app/secure as written (its pyproject's run config, secure-aggregation = true): fedgma's
    ServerApp and ClientApp on 10 SuperNodes, 5 per round, 6 rounds of GMA + adam through SecAgg+."""
    import json

    from flwr.common.config import flatten_dict

    from fedgma.flower.app import client_app, server_app

    app = tomllib.loads((SECURE_APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    run_config, components = flatten_dict(app["config"]), app["components"]
    assert run_config["secure-aggregation"] is True and run_config["server.aggregator"] == "gma"
    assert components == {"serverapp": "fedgma.flower.app:server_app", "clientapp": "fedgma.flower.app:client_app"}
    run_dir = tmp_path / "run"
    simulate(server_app, client_app, num_supernodes=run_config["data.num_clients"],
             run_config={**run_config, "run-dir": str(run_dir)})
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r["secure_aggregation"] and r["secure_num_clients"] == 5 and r["secure_num_dropped"] == 0
               and r["secure_clipped_fraction"] == 0.0 for r in rounds), rounds
    assert [m["round"] for m in metrics] == [2, 4, 6]
    accuracies = [summary["initial"]["test_accuracy"]] + [m["test_accuracy"] for m in metrics]
    print("secure example: test accuracy", accuracies)
    assert accuracies == sorted(accuracies) and accuracies[-1] > accuracies[0] + 0.3, accuracies
