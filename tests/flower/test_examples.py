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
