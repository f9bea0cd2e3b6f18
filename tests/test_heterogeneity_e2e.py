"""End-to-end runs of the heterogeneity settings: every config in configs/ runs, and the OOD settings really are OOD."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from click.testing import CliRunner

from fedgma.cli import main
from fedgma.config import load_config, upgrade_raw
from fedgma.simulation import run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
FASHION = Path("/usr/share/datasets/fashion-mnist")

FAST = ["rounds=1", "eval_every=1", "checkpoint_every=0", "threads=1", "client.local_steps=2",
        "data.train_subset=3000", "data.test_subset=500", "server.clients_per_round=2"]


def part(data: dict, key: str, default: str) -> str:
    """The name of part ``data.<key>``, written as a bare name or as a table with ``name``."""
    value = data.get(key, default)
    return value.get("name", default) if isinstance(value, dict) else value


def tiny(config: Path) -> list[str]:
    """Overrides that keep the config's setting but make it run in about a second."""
    data = upgrade_raw(tomllib.loads(config.read_text())).get("data", {})
    dataset, partition = part(data, "dataset", "fashion-mnist"), part(data, "partition", "dirichlet")
    overrides = list(FAST)
    if partition == "natural" and dataset.startswith("colored"):
        environments = len(data.get("dataset", {}).get("train_probabilities", [0.9, 0.8]))
        overrides += ["data.dataset.clients_per_environment=1", f"data.num_clients={environments}"]
    elif partition in ("natural", "shards"):  # shards: 10 classes, 2 per client need ≥ 5 clients
        overrides += ["data.num_clients=5"]
    else:
        overrides += ["data.num_clients=4"]
    if data.get("holdout_clients"):
        overrides += ["data.holdout_clients=2"]
    return overrides


def test_every_heterogeneity_config_is_here():
    names = {c.stem for c in CONFIGS}
    assert {
        "fmnist-dirichlet0.1", "fmnist-dirichlet0.5", "fmnist-iid", "fmnist-shards2", "fmnist-quantity-skew",
        "fmnist-quantity-label-skew", "fmnist-noise-feature-skew", "fmnist-rotated-ood", "colored-fmnist",
        "colored-fmnist-mixed", "synthetic-1-1", "fmnist-heldout-clients",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_runs(config, tmp_path):
    raw = upgrade_raw(tomllib.loads(config.read_text()))
    if "fashion" in part(raw.get("data", {}), "dataset", "fashion-mnist") and not FASHION.is_dir():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path / "run"
    args = ["run", str(config), "--quiet", "--out", str(out)]
    for item in tiny(config):
        args += ["--set", item]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    final = json.loads((out / "summary.json").read_text())["final"]
    assert 0 <= final["test_accuracy"] <= 1
    for name in ("partition.json", "partition_heatmap.png", "client_sizes.png"):
        assert (out / name).is_file()
    domains = raw.get("data", {}).get("domains", {})
    if domains.get("test") or part(raw["data"], "dataset", "").startswith("colored"):
        assert "ood_accuracy" in final and "ood_accuracy" in result.output
    if raw["data"].get("holdout_clients"):
        assert {"holdout_mean_accuracy", "holdout_worst10_accuracy"} <= set(final)
        assert final["holdout_worst10_accuracy"] <= final["holdout_mean_accuracy"]


needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")


@needs_fashion
def test_rotated_domains_are_out_of_distribution_for_fedavg(tmp_path):
    """FedAvg trained on 0°/15°/30°/45° clients does measurably worse on 60° and 90° test images."""
    config = load_config(ROOT / "configs/fmnist-rotated-ood.toml", [
        "rounds=4", "eval_every=4", "checkpoint_every=0", "threads=1", "server.aggregator=mean",
        "data.num_clients=4", "server.clients_per_round=4", "data.train_subset=4000", "data.test_subset=1000",
        "client.local_steps=20",
    ])
    summary = run(config, tmp_path, progress=False)
    final = summary["final"]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"test_accuracy", "ood_accuracy", "ood/rot60_accuracy", "ood/rot90_accuracy"} <= set(metrics[-1])
    assert final["ood_accuracy"] == pytest.approx((final["ood/rot60_accuracy"] + final["ood/rot90_accuracy"]) / 2)
    assert final["test_accuracy"] > 0.4  # it learnt the in-distribution task …
    assert final["ood_accuracy"] < final["test_accuracy"] - 0.15  # … and the held-out angles are much harder
    assert final["ood/rot90_accuracy"] < final["ood/rot60_accuracy"]  # the farther from the training angles, the worse


@needs_fashion
def test_colored_environments_report_the_reversed_environment(tmp_path):
    """Trained on colour-label agreement 0.9/0.8, the model leans on colour: reversed-colour accuracy drops."""
    config = load_config(ROOT / "configs/colored-fmnist.toml", [
        "rounds=3", "eval_every=3", "checkpoint_every=0", "threads=1", "server.aggregator=mean",
        "data.num_clients=2", "data.dataset.clients_per_environment=1", "server.clients_per_round=2",
        "data.train_subset=4000", "data.test_subset=1000", "client.local_steps=20",
    ])
    final = run(config, tmp_path, progress=False)["final"]
    assert final["ood_accuracy"] == final["ood/env0.1_accuracy"]
    assert final["test_accuracy"] > 0.7
    assert final["ood/env0.1_accuracy"] < final["test_accuracy"] - 0.2
    partition = json.loads((tmp_path / "partition.json").read_text())
    assert partition["colour_agreement"] == {"train_mixture": pytest.approx(0.85, abs=0.01), "ood": 0.1}


def test_holdout_client_metrics_match_a_direct_evaluation(tmp_path):
    """holdout_* are the mean and worst-10% of per-client accuracies; with an IID split they track test_accuracy."""
    import torch

    from fedgma.data.federated import build_federated
    from fedgma.models import FlatModel, build_model
    from fedgma.seeding import torch_generator
    from fedgma.simulation import evaluate

    config = load_config(ROOT / "configs/fmnist-heldout-clients.toml", [
        "data.dataset=digits", "data.partition=iid", "data.num_clients=20", "data.holdout_clients=20",
        "rounds=20", "eval_every=20", "client.lr=0.1", "threads=1", "checkpoint_every=0",
    ])
    final = run(config, tmp_path, progress=False)["final"]
    data = build_federated(config.data, config.seed)
    model = FlatModel(build_model("mlp", data.input_shape, data.num_classes, torch_generator(0, "init")), "cpu")
    params = torch.load(tmp_path / "final_model.pt")["params"]
    accuracies = sorted(evaluate(model, params, c)["accuracy"] for c in data.holdout_clients)
    assert final["holdout_mean_accuracy"] == pytest.approx(sum(accuracies) / 20)
    assert final["holdout_worst10_accuracy"] == pytest.approx((accuracies[0] + accuracies[1]) / 2)  # 10% of 20
    assert final["test_accuracy"] > 0.4
    assert abs(final["holdout_mean_accuracy"] - final["test_accuracy"]) < 0.1  # IID: unseen clients look like test
