"""Fault injection and how the round loop survives it: NaN, crashes, stragglers, Byzantine replies."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from fedgma.checkpoint import list_checkpoints, load_checkpoint
from fedgma.client import ClientResult
from fedgma.config import ConfigError, load_config
from fedgma.data.arrays import ArrayDataset
from fedgma.data.federated import build_federated
from fedgma.faults import ROUND_FAULTS, attack_update, flip_labels, label_flip_clients, poison_labels, round_faults
from fedgma.simulation import BadUpdateError, run

DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=20", "data.min_size=5",
    "server.clients_per_round=10", "client.batch_size=32", "client.lr=0.05", "eval_every=2", "threads=1",
]


def faults(**fractions):
    return SimpleNamespace(**{kind: fractions.get(kind, 0.0) for kind in ROUND_FAULTS})


@pytest.fixture(scope="module")
def digits_data():
    config = load_config(None, DIGITS)
    return build_federated(config.data, config.seed)


def rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# The seeded fault plan
# --------------------------------------------------------------------------------------------


def test_round_faults_are_exact_disjoint_seeded_and_vary_by_round():
    clients = list(range(100, 120))
    config = faults(crash=0.1, straggle=0.05, nan=0.2, sign_flip=0.25, scale=0.1)
    plan = round_faults(config, seed=3, round_index=7, client_ids=clients)
    counts = {kind: sum(v == kind for v in plan.values()) for kind in ROUND_FAULTS}
    assert counts == {"crash": 2, "straggle": 1, "nan": 4, "sign_flip": 5, "scale": 2}
    assert set(plan) <= set(clients)
    assert plan == round_faults(config, seed=3, round_index=7, client_ids=clients)
    assert plan != round_faults(config, seed=3, round_index=8, client_ids=clients)
    assert plan != round_faults(config, seed=4, round_index=7, client_ids=clients)
    assert round_faults(faults(), seed=3, round_index=7, client_ids=clients) == {}


def test_fractional_counts_are_right_on_average():
    clients = list(range(10))
    total = sum(len(round_faults(faults(nan=0.15), 0, r, clients)) for r in range(1, 2001))
    assert abs(total / 2000 - 1.5) < 0.05  # 0.15 · 10 = 1.5 NaN clients per round on average


def test_one_fraction_does_not_move_another_kinds_clients():
    clients = list(range(10))
    alone = round_faults(faults(crash=0.2), 0, 5, clients)
    both = round_faults(faults(crash=0.2, scale=0.3), 0, 5, clients)
    assert {c for c, k in both.items() if k == "crash"} == set(alone)


def test_attacks_change_the_update_as_described():
    update = torch.tensor([1.0, -2.0, 0.5])
    result = ClientResult(client_id=4, update=update, num_samples=10, num_steps=2, train_loss=0.3)
    assert torch.isnan(attack_update(result, "nan").update).all()
    assert torch.equal(attack_update(result, "sign_flip").update, -update)
    assert torch.equal(attack_update(result, "scale", 10.0).update, 10 * update)
    assert torch.equal(result.update, update)  # the honest result is left alone
    with pytest.raises(ValueError, match="fault 'crash' changes no update"):
        attack_update(result, "crash")


def test_label_flips_are_a_fixed_seeded_subset(digits_data):
    chosen = label_flip_clients(0.25, seed=0, num_clients=20)
    assert len(chosen) == 5 and chosen == label_flip_clients(0.25, seed=0, num_clients=20)
    data = ArrayDataset(torch.zeros(4, 2), torch.tensor([0, 3, 9, 5]))
    assert flip_labels(data, 10).y.tolist() == [9, 6, 0, 4]
    assert torch.equal(flip_labels(flip_labels(data, 10), 10).y, data.y)
    poisoned = poison_labels(digits_data, chosen)
    for i, (before, after) in enumerate(zip(digits_data.clients, poisoned.clients, strict=True)):
        expected = 9 - before.y if i in chosen else before.y
        assert torch.equal(after.y, expected)
    assert poisoned.test is digits_data.test


def test_faults_config_is_validated():
    with pytest.raises(ConfigError, match=r"config key 'faults': .*must be ≤ 1 .*got 1.1"):
        load_config(None, ["faults.nan=0.6", "faults.sign_flip=0.5"])
    with pytest.raises(ConfigError, match="config key 'faults.crash'"):
        load_config(None, ["faults.crash=-0.1"])
    with pytest.raises(ConfigError, match=r"'server.on_bad_update': Input should be 'fail' or 'drop'"):
        load_config(None, ["server.on_bad_update=ignore"])
    with pytest.raises(ConfigError, match="'server.min_clients': 11 exceeds server.clients_per_round = 10"):
        load_config(None, ["server.min_clients=11"])


# --------------------------------------------------------------------------------------------
# The round loop under faults
# --------------------------------------------------------------------------------------------


def test_nan_clients_dropped_training_improves_and_checkpoints_stay_finite(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=6", "faults.nan=0.2", "server.on_bad_update=drop",
                                "checkpoint_every=1"])
    summary = run(config, tmp_path, progress=False, data=digits_data)
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.15
    assert summary["final"]["test_loss"] < summary["initial"]["test_loss"]
    for record in rounds(tmp_path):
        nan_clients = {c for c, kind in record["faults"].items() if kind == "nan"}
        assert len(nan_clients) == 2 and set(record["dropped"]) == nan_clients
        assert all("NaN/infinite" in why for why in record["dropped"].values())
    for _, path in list_checkpoints(tmp_path):
        checkpoint = load_checkpoint(path)
        tensors = [checkpoint["params"], *[v for v in checkpoint["server_optimizer"].values() if v is not None]]
        assert all(bool(torch.isfinite(t).all()) for t in tensors)


def test_nan_client_with_fail_policy_stops_naming_client_and_round(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=3", "faults.nan=0.1"])
    nan_client = next(c for c, kind in round_faults(config.faults, config.seed, 1,
                                                    _sampled(config, 1)).items() if kind == "nan")
    with pytest.raises(BadUpdateError, match=rf"^round 1: client {nan_client} sent an update with \d+ NaN/infinite"):
        run(config, tmp_path, progress=False, data=digits_data)
    assert not (tmp_path / "summary.json").exists()


def _sampled(config, round_index):
    from fedgma.simulation import sample_clients

    return sample_clients(config.seed, round_index, config.data.num_clients, config.server.clients_per_round)


def test_scaled_updates_above_the_norm_bound_are_dropped(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=2", "faults.scale=0.2", "faults.scale_factor=1000",
                                "server.max_update_norm=50", "server.on_bad_update=drop"])
    run(config, tmp_path, progress=False, data=digits_data)
    for record in rounds(tmp_path):
        scaled = {c for c, kind in record["faults"].items() if kind == "scale"}
        assert set(record["dropped"]) == scaled
        assert all("> server.max_update_norm = 50" in why for why in record["dropped"].values())


def test_crashes_and_stragglers_leave_the_round_to_the_others(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=6", "faults.crash=0.2", "faults.straggle=0.2",
                                "server.min_clients=5", "client.lr=0.1", "client.local_epochs=5"])
    summary = run(config, tmp_path, progress=False, data=digits_data)
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.15
    assert summary["final"]["test_loss"] < summary["initial"]["test_loss"]
    for record in rounds(tmp_path):
        assert sorted(record["dropped"].values()) == ["crashed"] * 2 + ["straggled past the round deadline"] * 2
        assert "skipped" not in record


def test_too_few_replies_skip_the_round_and_keep_the_model(tmp_path, digits_data):
    config = load_config(None, [*DIGITS, "rounds=3", "faults.crash=0.7", "server.min_clients=4"])
    summary = run(config, tmp_path, progress=False, data=digits_data)
    assert all(r["skipped"] is True and r["update_norm"] == 0.0 for r in rounds(tmp_path))
    assert summary["final"]["test_accuracy"] == summary["initial"]["test_accuracy"]


def test_gma_agreement_drops_under_sign_flipping(tmp_path, digits_data):
    """Sign-flipped replies oppose the honest ones, so GMA's sign agreement and mask density fall."""
    clean = load_config(None, [*DIGITS, "rounds=3"])
    attacked = load_config(None, [*DIGITS, "rounds=3", "faults.sign_flip=0.3"])
    run(clean, tmp_path / "clean", progress=False, data=digits_data)
    run(attacked, tmp_path / "attacked", progress=False, data=digits_data)
    for a, b in zip(rounds(tmp_path / "clean"), rounds(tmp_path / "attacked"), strict=True):
        assert b["agreement_mean"] < a["agreement_mean"]
        assert b["mask_density"] < a["mask_density"]
