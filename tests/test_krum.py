"""Krum and Multi-Krum (Blanchard et al. 2017): hand-computed scores, outlier rejection, a numpy reference.

The properties every rule shares (order, weights, bad input, options) are in test_aggregators_suite.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgma.aggregation import available_aggregators, make_aggregator, mean
from fedgma.config import load_config
from fedgma.krum import KrumAggregator, krum, krum_scores
from fedgma.simulation import run

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Five points in the plane; with f = 1 each score sums the n − f − 2 = 2 smallest squared distances:
#   a=(0,0): {b 1, e 2, c 4, z 162} -> 3      b=(1,0): {a 1, e 1, c 5, z 145} -> 2
#   c=(0,2): {e 2, a 4, b 5, z 130} -> 6      e=(1,1): {b 1, a 2, c 2, z 128} -> 3
#   z=(9,9): {e 128, c 130, b 145, a 162} -> 258
POINTS = [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0), (1.0, 1.0), (9.0, 9.0)]


def points(dtype=torch.float64):
    return [torch.tensor(p, dtype=dtype) for p in POINTS]


def reference_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Blanchard et al.'s scores written directly in float64 numpy."""
    n = len(updates)
    distances = ((updates[:, None, :] - updates[None, :, :]) ** 2).sum(-1)
    return np.array([np.sort(np.delete(distances[i], i))[: n - f - 2].sum() for i in range(n)])


def test_krum_is_registered_with_its_options():
    assert "krum" in available_aggregators()
    aggregator = make_aggregator("krum", num_byzantine=2, num_selected=3)
    assert isinstance(aggregator, KrumAggregator)
    assert aggregator.get_config() == {"name": "krum", "num_byzantine": 2, "num_selected": 3}


def test_scores_and_selection_on_a_hand_computed_case():
    assert krum_scores(points(), 1).tolist() == [3.0, 2.0, 6.0, 3.0, 258.0]
    assert krum_scores(points(), 0).tolist() == [1 + 2 + 4, 1 + 1 + 5, 2 + 4 + 5, 1 + 2 + 2, 128 + 130 + 145]
    assert torch.equal(krum(points(), num_byzantine=1), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # Multi-Krum, m = 3: b (2), then a and e (3 each): ((1,0) + (0,0) + (1,1)) / 3.
    aggregator = make_aggregator("krum", num_byzantine=1, num_selected=3)
    for update, weight in zip(points(), [10, 1, 1, 1, 1000], strict=True):
        aggregator.add(update, weight)
    result, stats = aggregator.result()
    assert torch.equal(result, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert stats == {"num_clients": 5, "selected": [1, 0, 3], "score_selected_max": 3.0}


def test_equal_scores_are_ordered_by_value_whatever_the_client_order():
    # On a line, 0, 1, 2, 3, 10 with f = 1 score 5, 2, 2, 5, 113: 1 and 2 tie; the smaller value wins.
    line = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 3.0, 10.0)]
    assert krum_scores(line, 1).tolist() == [5.0, 2.0, 2.0, 5.0, 113.0]
    assert krum(line).item() == 1.0
    assert krum(line[::-1]).item() == 1.0
    assert krum([line[i] for i in (2, 4, 1, 0, 3)], num_selected=2).item() == 1.5


def test_krum_refuses_too_few_updates_and_too_many_selected_in_one_line():
    with pytest.raises(ValueError, match=r"^cannot aggregate: krum needs more than 2·num_byzantine \+ 2 = 4 "
                                         r"updates \(num_byzantine = 1\), got 4$"):
        krum(torch.zeros(4, 3))
    krum(torch.zeros(5, 3))  # n = 2f + 3 is enough
    with pytest.raises(ValueError, match="got 2$"):
        krum(torch.zeros(2, 3), num_byzantine=0)
    with pytest.raises(ValueError, match=r"^cannot aggregate: krum num_selected = 6 is more than the 5 updates"):
        krum(torch.zeros(5, 3), num_selected=6)
    with pytest.raises(ValueError, match="got 5 updates but 4 weights"):
        krum(torch.zeros(5, 3), [1.0] * 4)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_byzantine": -1}, "option 'num_byzantine': Input should be greater than or equal to 0; "
                             "expected an integer in \\[0, 1000000\\] \\(got -1\\)"),
    ({"num_selected": 0}, "option 'num_selected': Input should be greater than or equal to 1; "
                           "expected an integer in \\[1, 1000000\\] \\(got 0\\)"),
    ({"num_selected": 1.5}, "option 'num_selected': Input should be a valid integer"),
    ({"byzantine": 1}, r"has no option 'byzantine' \(did you mean 'num_byzantine'\?\)"),
])
def test_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator("krum", **options)


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1), f=st.integers(0, 3), extra=st.integers(1, 4), d=st.integers(1, 20),
    m_fraction=st.floats(0, 1),
)
def test_matches_a_numpy_reference_and_is_the_mean_of_the_selected_updates(seed, f, extra, d, m_fraction):
    n = 2 * f + 2 + extra
    m = 1 + int(m_fraction * (n - 1))
    updates = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    aggregator = make_aggregator("krum", num_byzantine=f, num_selected=m)
    for update in updates:
        aggregator.add(update, 1.0)
    result, stats = aggregator.result()
    scores = reference_scores(updates.numpy(), f)
    np.testing.assert_allclose(krum_scores(list(updates), f).numpy(), scores, rtol=1e-12)
    selected = stats["selected"]
    others = sorted(set(range(n)) - set(selected))
    # The m lowest scores are selected (ties, which happen, e.g. the closest pair when n − f − 2 = 1, go either way).
    assert len(selected) == m and (not others or scores[selected].max() <= scores[others].min() * (1 + 1e-12))
    assert torch.equal(result, mean([updates[i] for i in selected]))  # the plain mean, bit for bit
    np.testing.assert_allclose(result.numpy(), updates.numpy()[selected].mean(0), rtol=1e-12, atol=1e-12)


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1), f=st.integers(1, 3), extra=st.integers(1, 5), d=st.integers(1, 30),
    attack=st.sampled_from(["far", "colluding", "scaled"]),
)
def test_byzantine_updates_are_never_selected(seed, f, extra, d, attack):
    """n − f honest updates in a ball of radius ~1, f attackers ≥ 100 away: Krum and Multi-Krum keep only honest ones.

    An honest update's n − f − 2 nearest are honest (within the ball), while an attacker's include
    at least n − 2f − 1 ≥ 2 honest ones, each ≥ 100 away, so every attacker scores higher.
    """
    n = 2 * f + 2 + extra
    generator = torch.Generator().manual_seed(seed)
    honest = torch.randn(n - f, d, generator=generator) / d**0.5 + 1.0
    if attack == "far":
        attackers = 100.0 + 50 * torch.rand(f, d, generator=generator)
    elif attack == "colluding":  # identical attackers: distance 0 to one another
        attackers = torch.full((f, d), -150.0)
    else:  # a scaled copy of an honest update, the usual model-replacement attack
        attackers = -200.0 * honest[:f]
    updates = list(torch.cat([honest, attackers]).unbind(0))
    order = torch.randperm(n, generator=generator).tolist()
    shuffled = [updates[i] for i in order]
    honest_positions = {p for p, i in enumerate(order) if i < n - f}
    for m in (1, n - f):
        aggregator = make_aggregator("krum", num_byzantine=f, num_selected=m)
        for position, update in enumerate(shuffled):  # attackers also claim huge sample counts
            aggregator.add(update, 1e6 if position not in honest_positions else 1.0)
        result, stats = aggregator.result()
        assert set(stats["selected"]) <= honest_positions
        assert bool((result - 1.0).abs().max() < 10)
        if m == n - f:  # every honest update, averaged plainly
            torch.testing.assert_close(result, honest.mean(0), rtol=1e-5, atol=1e-5)


def test_with_no_byzantine_and_every_update_selected_it_is_the_unweighted_mean():
    updates = torch.randn(6, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    result = krum(updates, [1, 2, 3, 4, 5, 600], num_byzantine=0, num_selected=6)
    torch.testing.assert_close(result, updates.mean(0), rtol=1e-14, atol=1e-14)  # summed in score order
    assert torch.equal(result, krum(updates, None, num_byzantine=0, num_selected=6))  # weights do not count


def test_updates_are_copied_so_a_reused_buffer_does_not_change_the_result():
    buffer = torch.zeros(2)
    aggregator = make_aggregator("krum", num_byzantine=0)
    for p in POINTS[:3]:
        buffer.copy_(torch.tensor(p))
        aggregator.add(buffer)
    buffer.fill_(1e6)
    expected = krum([torch.tensor(p, dtype=torch.float32) for p in POINTS[:3]], num_byzantine=0)
    assert torch.equal(aggregator.result()[0], expected)


def test_a_run_with_multi_krum_learns_digits_and_logs_the_selection(tmp_path):
    config = load_config(None, [
        "data.dataset=digits", "data.partition=iid", "data.num_clients=10", "model.name=mlp",
        "server.clients_per_round=6", "client.batch_size=16", "client.lr=0.05", "rounds=8", "eval_every=4",
        "server.aggregator=krum", "server.aggregator.num_byzantine=1", "server.aggregator.num_selected=3",
    ])
    summary = run(config, tmp_path, progress=False)
    assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.25
    rounds = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert all(len(r["selected"]) == 3 and set(r["selected"]) <= set(range(6)) for r in rounds)
