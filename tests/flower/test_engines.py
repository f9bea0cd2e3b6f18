"""The same config on the simulator and on Flower's simulation runtime: equal accuracy at every evaluation.

Every recipe the Flower engine runs (fedavg, fedavgm, fedprox, scaffold, fedadam, fedyogi,
fedadagrad) × every aggregator (gma, mean, median, trimmed_mean, krum), on digits, 5 clients, 4 per
round, 2 rounds. All the Flower runs of a test share one simulation (one Ray start-up): one
ServerApp runs the configs one after the other with :func:`fedgma.flower.server_app.serve`, against the
same virtual SuperNodes running ``fedgma.flower.client_app.client_app`` (SCAFFOLD's c_i in each node's
Context state, told apart per experiment).

The one arithmetic difference between the engines: a Flower client replies with its model θ + Δ and
the server takes (θ + Δ) − θ, so updates differ by float32 rounding. Accuracy is compared exactly
(the number of correctly classified test digits), train loss and local steps too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from flower_sim import simulate  # noqa: E402  (beside this file)
from flwr.serverapp import ServerApp  # noqa: E402

from fedgma.checkpoint import load_final_model  # noqa: E402
from fedgma.config import parse_config, resolve  # noqa: E402
from fedgma.flower.client_app import client_app  # noqa: E402
from fedgma.flower.server_app import serve  # noqa: E402
from fedgma.simulation import run as run_simulator  # noqa: E402

pytestmark = pytest.mark.flower

RECIPES = ["fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad"]
AGGREGATORS = {
    "gma": {"name": "gma", "threshold": 0.4},
    "mean": {"name": "mean"},
    "median": {"name": "median"},
    "trimmed_mean": {"name": "trimmed_mean", "trim_fraction": 0.25},
    "krum": {"name": "krum", "num_byzantine": 0, "num_selected": 2},
}
NUM_CLIENTS = 5
# every recipe and every aggregator at least once (the default run); the whole grid is slow
SUBSET = [(recipe, list(AGGREGATORS)[i % len(AGGREGATORS)]) for i, recipe in enumerate(RECIPES)]
GRID = [(recipe, aggregator) for recipe in RECIPES for aggregator in AGGREGATORS]


def make_config(recipe: str, aggregator: str):
    raw = {
        "seed": 1, "rounds": 2, "eval_every": 1, "algorithm": recipe, "threads": 1,
        "data": {"dataset": "digits", "num_clients": NUM_CLIENTS,
                 "partition": {"name": "dirichlet", "alpha": 1.0, "min_size": 20}},
        "model": {"name": "mlp"},
        "client": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "server": {"clients_per_round": 4, "aggregator": dict(AGGREGATORS[aggregator])},
    }
    return resolve(parse_config(raw))


def read(folder: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def final_params(folder: Path):
    return load_final_model(folder / "final_model.pt")["params"]


def compare_engines(pairs: list[tuple[str, str]], tmp_path: Path) -> dict[str, float]:
    """Run ``pairs`` on both engines; assert equal metrics; return each run's max |θ_flower − θ_simulator|."""
    configs = {pair: make_config(*pair) for pair in pairs}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        for (recipe, aggregator), config in configs.items():
            serve(grid, config, tmp_path / "flower" / f"{recipe}-{aggregator}")

    simulate(server_app, client_app, NUM_CLIENTS)
    differences, gaps = [], {}
    for (recipe, aggregator), config in configs.items():
        name = f"{recipe}-{aggregator}"
        run_simulator(config, tmp_path / "simulator" / name, progress=False)
        ours = read(tmp_path / "simulator" / name, "metrics.jsonl")
        theirs = read(tmp_path / "flower" / name, "metrics.jsonl")
        assert [r["round"] for r in ours] == [r["round"] for r in theirs] == [1, 2], name
        for a, b in zip(ours, theirs, strict=True):
            if a["test_accuracy"] != b["test_accuracy"] or a["total_local_steps"] != b["total_local_steps"]:
                differences.append((name, a["round"], a["test_accuracy"], b["test_accuracy"]))
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), name
        rounds = [r["clients"] for r in read(tmp_path / "flower" / name, "rounds.jsonl")]
        assert rounds == [r["clients"] for r in read(tmp_path / "simulator" / name, "rounds.jsonl")], name
        gaps[name] = float((final_params(tmp_path / "flower" / name) - final_params(tmp_path / "simulator" / name))
                           .abs().max())
    assert not differences, differences
    assert max(gaps.values()) < 1e-4, gaps  # float32 rounding of (θ + Δ) − θ only
    return gaps


def test_every_recipe_and_every_aggregator_give_the_simulators_accuracy_on_flower(tmp_path):
    """7 configs: each recipe once, the aggregators in turn (every one at least once)."""
    assert {a for _, a in SUBSET} == set(AGGREGATORS)
    gaps = compare_engines(SUBSET, tmp_path)
    # SCAFFOLD's corrections took effect on Flower: its model is far from FedAvg's, and at the simulator's
    aggregator = dict(SUBSET)["scaffold"]
    run_simulator(make_config("fedavg", aggregator), tmp_path / "fedavg", progress=False)
    scaffold = final_params(tmp_path / "flower" / f"scaffold-{aggregator}")
    assert float((scaffold - final_params(tmp_path / "fedavg")).abs().max()) > 100 * gaps[f"scaffold-{aggregator}"]


@pytest.mark.slow
def test_the_whole_grid_of_recipes_and_aggregators_gives_the_simulators_accuracy_on_flower(tmp_path):
    """All 35 (recipe, aggregator) pairs."""
    compare_engines(GRID, tmp_path)
