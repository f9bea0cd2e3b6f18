"""A rule's own randomness under Flower follows (seed, round), as on the simulator."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from fedgma.flower.strategy import FedgmaStrategy  # noqa: E402
from fedgma.simulation import aggregator_maker  # noqa: E402


def fold(aggregator, updates):
    for update in updates:
        aggregator.add(update, 1.0)
    return aggregator.result()[0]


def test_random_mask_differs_per_round_and_matches_the_simulators_draw():
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(200, generator=g) for _ in range(5)]
    strategy = FedgmaStrategy(aggregator="gma_random_mask", seed=3)
    first, again, second = (fold(strategy._new_aggregator(r), updates) for r in (1, 1, 2))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    simulator = aggregator_maker("gma_random_mask", {}, None, None, 3)
    assert torch.equal(first, fold(simulator(1), updates))
