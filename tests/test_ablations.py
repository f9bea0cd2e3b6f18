"""The mechanism ablations of GMA (fedgma.ablations): random-placement mask and density-scaled mean."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fedgma.ablations import gma_random_mask, mean_density_scaled
from fedgma.aggregation import Layer, gma, gma_mask, make_aggregator, mean
from fedgma.config import load_config
from fedgma.seeding import torch_generator
from fedgma.simulation import aggregator_factory, run

# Three clients, d = 6: signs sum to [3, 1, 3, -1, 1, -3], agreement [1, 1/3, 1, 1/3, 1/3, 1].
UPDATES = torch.tensor([
    [1.0, 2.0, 3.0, -4.0, 5.0, -6.0],
    [1.0, -2.0, 3.0, 4.0, -5.0, -6.0],
    [1.0, 2.0, 3.0, -4.0, 5.0, -6.0],
], dtype=torch.float64)


def _updates(seed: int, k: int = 10, d: int = 1000, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    updates = torch.randn(k, d, generator=generator, dtype=dtype)
    weights = torch.randint(1, 100, (k,), generator=generator).double().tolist()
    return updates, weights


def test_both_rules_are_registered():
    from fedgma.aggregation import available_aggregators

    assert {"gma_random_mask", "mean_density_scaled"} <= set(available_aggregators())


def test_hand_computed_case():
    # threshold 0.5: the mask is [1, 1/3, 1, 1/3, 1/3, 1]; density (3 + 3 · 1/3) / 6 = 2/3
    average, density = mean_density_scaled(UPDATES, threshold=0.5)
    assert density == pytest.approx(2 / 3, abs=1e-7)
    mean_update = torch.tensor([1.0, 2 / 3, 3.0, -4 / 3, 5 / 3, -6.0], dtype=torch.float64)
    assert torch.allclose(average, mean_update * density, rtol=0, atol=1e-12)
    shuffled_avg, shuffled = gma_random_mask(UPDATES, threshold=0.5)
    assert sorted(shuffled.tolist()) == pytest.approx(sorted([1, 1 / 3, 1, 1 / 3, 1 / 3, 1]), abs=1e-15)
    assert torch.equal(shuffled_avg, mean(UPDATES) * shuffled)


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mean_density_scaled_is_mean_times_gma_density_exactly(hard, weighted, dtype):
    updates, weights = _updates(1, dtype=dtype)
    aggregator = make_aggregator("gma", threshold=0.4, hard=hard, weighted_agreement=weighted)
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    _, gma_stats = aggregator.result()
    scaled, density = mean_density_scaled(updates, weights, threshold=0.4, hard=hard, weighted_agreement=weighted)
    assert density == gma_stats["mask_density"]
    assert 0.0 < density < 1.0
    assert torch.equal(scaled, mean(updates, weights) * density)
    assert scaled.dtype == dtype


@pytest.mark.parametrize("hard", [False, True])
def test_random_mask_has_gmas_mask_values_and_density_placed_by_the_generator(hard):
    updates, weights = _updates(2, dtype=torch.float64)
    gma_average, gma_values = gma(updates, weights, threshold=0.4, hard=hard)
    aggregator = make_aggregator("gma_random_mask", threshold=0.4, hard=hard)
    aggregator.generator = torch_generator(5, "aggregation", 3)
    for update, weight in zip(updates, weights, strict=True):
        aggregator.add(update, weight)
    average, stats = aggregator.result()
    shuffled = stats["mask"]
    assert torch.equal(torch.sort(shuffled).values, torch.sort(gma_values).values)  # the same multiset of values
    assert not torch.equal(shuffled, gma_values)  # in other places
    gma_aggregator = make_aggregator("gma", threshold=0.4, hard=hard)
    for update, weight in zip(updates, weights, strict=True):
        gma_aggregator.add(update, weight)
    _, gma_stats = gma_aggregator.result()
    for key in ("mask_density", "mask_pass_fraction", "agreement_mean", "agreement_histogram"):
        assert stats[key] == gma_stats[key], key
    assert float(shuffled.mean()) == pytest.approx(gma_stats["mask_density"], rel=1e-7)  # GMA sums in float32
    order = torch.randperm(updates.shape[1], generator=torch_generator(5, "aggregation", 3))
    assert torch.equal(shuffled, gma_values[order])
    assert torch.equal(average, mean(updates, weights) * gma_values[order])
    assert not torch.equal(average, gma_average)


def test_random_mask_per_layer_densities_are_those_of_the_mask_applied():
    updates, _ = _updates(3, d=100)
    layers = [Layer("a", 0, 30), Layer("b", 30, 70)]
    aggregator = make_aggregator("gma_random_mask", layers=layers)
    for update in updates:
        aggregator.add(update)
    _, stats = aggregator.result()
    assert stats["mask_density/a"] == float(stats["mask"][:30].float().mean())
    assert stats["mask_density/b"] == float(stats["mask"][30:].float().mean())


def _factory(seed: int):
    config = load_config(None, ["server.aggregator.name=gma_random_mask", f"seed={seed}"])
    return aggregator_factory(config, types.SimpleNamespace(layers=None))


def _mask(make, round_index: int) -> torch.Tensor:
    updates, _ = _updates(4)
    aggregator = make(round_index)
    for update in updates:
        aggregator.add(update)
    return aggregator.result()[1]["mask"]


def test_the_simulators_masks_are_reproducible_per_seed_and_round_and_differ_between_them():
    make = _factory(7)
    assert torch.equal(_mask(make, 3), _mask(_factory(7), 3))  # same (seed, round): same mask, from a new factory
    assert not torch.equal(_mask(make, 3), _mask(make, 4))  # another round
    assert not torch.equal(_mask(make, 3), _mask(_factory(8), 3))  # another seed
    expected = gma_mask(_updates(4)[0].sign().sum(0).abs() / 10, 0.4)[torch.randperm(1000, generator=torch_generator(
        7, "aggregation", 3))]
    assert torch.equal(_mask(make, 3), expected)


def test_rules_without_a_generator_keep_their_factory_context():
    config = load_config(None, ["server.aggregator.name=gma"])
    aggregator = aggregator_factory(config, types.SimpleNamespace(layers=None))(5)
    assert aggregator.get_config()["name"] == "gma"


def test_the_generator_is_not_an_option():
    with pytest.raises(ValueError, match="has no option 'generator'"):
        load_config(None, ["server.aggregator.name=gma_random_mask", "server.aggregator.generator=1"])


DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=10", "data.min_size=5",
    "model.name=mlp", "server.clients_per_round=5", "client.batch_size=16", "client.lr=0.05", "eval_every=1",
    "rounds=3",
]


@pytest.mark.parametrize("name", ["gma_random_mask", "mean_density_scaled"])
def test_a_run_with_the_ablation_is_reproducible_and_logs_gmas_density(tmp_path, name):
    config = load_config(None, [*DIGITS, f"server.aggregator.name={name}"])
    first = run(config, tmp_path / "a", progress=False)
    second = run(config, tmp_path / "b", progress=False)
    assert first["final"]["test_accuracy"] == second["final"]["test_accuracy"]
    rounds = [json.loads(line) for line in (tmp_path / "a" / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3 and all(0 < r["mask_density"] <= 1 for r in rounds)
    gma = run(load_config(None, [*DIGITS, "server.aggregator.name=gma"]), tmp_path / "gma", progress=False)
    gma_rounds = [json.loads(line) for line in (tmp_path / "gma" / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["mask_density"] == gma_rounds[0]["mask_density"]  # round 1: same clients, same model
    assert first["final"]["test_accuracy"] != gma["final"]["test_accuracy"]
