"""The mechanism ablations of GMA (fedgma.ablations): random-placement mask and density-scaled mean."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fedgma.ablations import gma_random_mask, mean_density_scaled
from fedgma.aggregation import Layer, gma, gma_mask, make_aggregator, mean
from fedgma.client import ClientResult
from fedgma.config import load_config
from fedgma.round import ReplyPolicy, ServerState, run_round
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


def test_the_rules_are_registered():
    from fedgma.aggregation import available_aggregators

    assert {"gma_random_mask", "mean_density_scaled", "gma_mask_after_optimizer"} <= set(available_aggregators())


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


# --- gma_mask_after_optimizer: the mask moves from the optimizer's input to its step --------------------------


# round 2's updates: sign sums [1, 1, -1, 1, 1, 1], agreement 1/3 everywhere, so m = 1/3 at threshold 0.5
ROUND2 = torch.tensor([[1.0, 2.0, 1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0],
                       [1.0, 1.0, -3.0, 1.0, 1.0, 1.0]], dtype=torch.float64)


def _round_state(optimizer: str, options: dict) -> ServerState:
    from fedgma.client import LocalSGD, PlainClient
    from fedgma.server_opt import make_server_optimizer

    params = torch.randn(UPDATES.shape[1], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return ServerState(0, params, make_server_optimizer(optimizer, **options), PlainClient(LocalSGD()))


def _two_rounds(name: str, optimizer: str, options: dict) -> tuple[list[torch.Tensor], ServerState]:
    state = _round_state(optimizer, options)
    seen = [state.params.clone()]
    for round_index, updates in ((1, UPDATES), (2, ROUND2)):
        replies = [ClientResult(k, row.clone(), 1, 1, 0.0) for k, row in enumerate(updates)]
        state, outcome = run_round(state, round_index, replies,
                                   lambda: make_aggregator(name, threshold=0.5), ReplyPolicy(UPDATES.shape[1]))
        assert outcome.committed and "step_mask" not in outcome.stats
        seen.append(state.params.clone())
    return seen, state


def test_mask_after_optimizer_hand_computed_under_momentum():
    # threshold 0.5, round 1: m1 = [1, 1/3, 1, 1/3, 1/3, 1]; round 2: m2 = 1/3. The momentum buffer holds
    # the *unmasked* means ū1, ū2: v1 = -ū1, θ1 = θ0 + m1 ⊙ (lr ū1); v2 = 0.9 v1 - ū2, θ2 = θ1 - m2 ⊙ (lr v2)
    seen, state = _two_rounds("gma_mask_after_optimizer", "sgd", {"lr": 2.0, "momentum": 0.9})
    m1 = torch.tensor([1, 1 / 3, 1, 1 / 3, 1 / 3, 1], dtype=torch.float64)
    u1, u2 = mean(UPDATES), mean(ROUND2)
    v1 = -u1
    v2 = 0.9 * v1 - u2
    assert torch.allclose(seen[1], seen[0] + m1 * (2.0 * u1), rtol=0, atol=1e-12)
    assert torch.allclose(seen[2], seen[1] - (2.0 * v2) / 3, rtol=0, atol=1e-12)
    assert torch.allclose(state.server_optimizer.velocity, v2, rtol=0, atol=1e-12)  # unmasked memory
    before, _ = _two_rounds("gma", "sgd", {"lr": 2.0, "momentum": 0.9})  # gma: the buffer holds m ⊙ ū
    assert torch.allclose(before[1], seen[1], rtol=0, atol=1e-12)  # round 1 alike (no memory yet) ...
    assert not torch.allclose(before[2], seen[2], rtol=0, atol=1e-6)  # ... round 2 not


@pytest.mark.parametrize("optimizer, options", [("sgd", {"lr": 1.5}), ("adam", {"lr": 0.1})])
def test_mask_after_optimizer_matches_gma_without_memory_and_not_with_adaptive_moments(optimizer, options):
    after, _ = _two_rounds("gma_mask_after_optimizer", optimizer, options)
    before, _ = _two_rounds("gma", optimizer, options)
    if optimizer == "sgd":  # plain server SGD: θ + lr (m ⊙ ū) = θ + m ⊙ (lr ū), up to rounding
        for a, b in zip(after, before, strict=True):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    else:  # FedAdam normalises per coordinate: masking its input is not masking its step
        assert not torch.allclose(after[1], before[1], rtol=0, atol=1e-6)


def test_a_run_with_mask_after_optimizer_under_fedavgm_is_reproducible(tmp_path):
    overrides = [*DIGITS, "algorithm=fedavgm", "server.aggregator.name=gma_mask_after_optimizer"]
    first = run(load_config(None, overrides), tmp_path / "a", progress=False)
    second = run(load_config(None, overrides), tmp_path / "b", progress=False)
    assert first["final"]["test_accuracy"] == second["final"]["test_accuracy"]
    rounds = [json.loads(line) for line in (tmp_path / "a" / "rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == 3 and all(0 < r["mask_density"] <= 1 and "step_mask" not in r for r in rounds)
