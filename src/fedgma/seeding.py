"""Seeds: every random stream of a run derives from the config's one ``seed``.

A stream is named by a purpose and integer keys (round, client id), e.g.
``torch_generator(seed, "client", round, client_id)``; streams never share state, so adding a
client or changing the order clients run in leaves every other stream unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["PURPOSES", "numpy_rng", "seed_sequence", "torch_generator"]

PURPOSES = {
    "partition": 1, "init": 2, "sampling": 3, "client": 4, "data": 5, "faults": 6, "domains": 7, "validation": 8,
    "aggregation": 9,
}


def seed_sequence(seed: int, purpose: str, *keys: int) -> np.random.SeedSequence:
    """The SeedSequence of one named stream."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown random stream {purpose!r}; known: {', '.join(PURPOSES)}")
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(PURPOSES[purpose], *(int(k) for k in keys)))


def numpy_rng(seed: int, purpose: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(seed_sequence(seed, purpose, *keys))


def torch_generator(seed: int, purpose: str, *keys: int, device: str | torch.device = "cpu") -> torch.Generator:
    state = seed_sequence(seed, purpose, *keys).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state))
