"""fedgma.state_dicts: GMA on model state dicts equals GMA on the vectors flattened by hand."""

from __future__ import annotations

import pytest
import torch

from fedgma import gma_state_dicts
from fedgma.aggregation import gma, mean
from fedgma.state_dicts import mean_state_dicts


def _updates(k: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    states = []
    for _ in range(k):
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
        for p in model.parameters():
            p.data = torch.randn(p.shape, generator=generator)
        states.append(model.state_dict())
    return states


def test_gma_state_dicts_equals_flattening_by_hand() -> None:
    states = _updates()
    weights = [10.0, 20.0, 5.0, 65.0]
    aggregate, mask = gma_state_dicts(states, weights, threshold=0.5)
    keys = [k for k, v in states[0].items() if v.is_floating_point()]
    flat = torch.stack([torch.cat([s[k].reshape(-1) for k in keys]) for s in states])
    expected, expected_mask = gma(flat, weights, threshold=0.5)
    assert list(aggregate) == list(states[0])  # every key, in order
    assert torch.equal(torch.cat([aggregate[k].reshape(-1) for k in keys]), expected)
    assert torch.equal(torch.cat([mask[k].reshape(-1) for k in keys]), expected_mask)
    assert aggregate["0.weight"].shape == (4, 3) and aggregate["2.bias"].shape == (2,)
    # integer buffers are copied, never signed: BatchNorm's counter keeps its dtype and value
    assert aggregate["1.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(aggregate["1.num_batches_tracked"], states[0]["1.num_batches_tracked"])
    # τ = 0: plain weighted mean, p_k = n_k / Σ n_k
    plain, _ = gma_state_dicts(states, weights, threshold=0.0)
    by_hand = sum(w * s["0.weight"] for w, s in zip(weights, states, strict=True)) / sum(weights)
    assert torch.allclose(plain["0.weight"], by_hand, atol=1e-6)
    assert torch.equal(mean_state_dicts(states, weights)["2.weight"],
                       mean(flat, weights)[-10:-2].reshape(2, 4))


def test_gma_state_dicts_rejects_mismatched_and_bad_input() -> None:
    states = _updates(2)
    with pytest.raises(ValueError, match="no client state dict"):
        gma_state_dicts([])
    other = dict(states[1])
    other["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"client 1: '0.weight' has shape \(5, 3\), expected \(4, 3\)"):
        gma_state_dicts([states[0], other])
    other = {k: v for k, v in states[1].items() if k != "2.bias"}
    with pytest.raises(ValueError, match="client 1: state dict keys differ"):
        gma_state_dicts([states[0], other])
    bad = {k: v.clone() for k, v in states[1].items()}
    bad["2.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="client 1: update contains NaN"):
        gma_state_dicts([states[0], bad])
