"""Simulated client faults and attacks, for testing how a run survives them (config section ``[faults]``).

Each round, a seeded draw assigns at most one fault to each sampled client:

* ``crash``: the client never replies;
* ``straggle``: the client replies after the round's deadline, so its reply is discarded (it is
  simulated, not slept: the client is simply not heard from, as with a deadline in Flower);
* ``nan``: the client sends an update full of NaN (a numerical blow-up, or a malicious reply);
* ``sign_flip``: the client sends −Δ (a Byzantine sign-flipping attack, e.g. Allen-Zhu et al. 2020,
  Karimireddy et al. 2021);
* ``scale``: the client sends ``scale_factor``·Δ (a boosting / model-replacement attack, Bagdasaryan
  et al. 2020).

The number of clients with fault f in a round of K is ⌊f·K⌋ plus one more with probability
f·K − ⌊f·K⌋, so it is exactly f·K whenever that is an integer and f·K on average otherwise.

``label_flip`` is data poisoning: a fixed, seeded subset of the population trains on labels
y → C − 1 − y for the whole run (Tolpegin et al. 2020). It changes the clients' data view before any
backend sees it, so it works with every backend.

Every draw comes from ``fedgma.seeding`` with purpose ``"faults"`` and the round as key (key 0 for
the population-level label-flip subset), so faults are reproducible and a resumed run sees the
same faults as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from fedgma.client import ClientResult
from fedgma.data.arrays import ArrayDataset
from fedgma.data.federated import FederatedDataset
from fedgma.seeding import numpy_rng

__all__ = [
    "NO_REPLY",
    "ROUND_FAULTS",
    "attack_update",
    "flip_labels",
    "label_flip_clients",
    "poison_labels",
    "round_faults",
]

ROUND_FAULTS = ("crash", "straggle", "nan", "sign_flip", "scale")
NO_REPLY = {"crash": "crashed", "straggle": "straggled past the round deadline"}


def round_faults(faults: Any, seed: int, round_index: int, client_ids: Sequence[int]) -> dict[int, str]:
    """``{client id: fault}`` for the faulty clients among this round's ``client_ids`` (others are honest).

    ``faults`` is the ``[faults]`` config section (any object with the fractions as attributes).
    """
    rng = numpy_rng(seed, "faults", round_index)
    order = rng.permutation(len(client_ids))
    coins = rng.random(len(ROUND_FAULTS))  # always drawn, so one fraction never shifts another's stream
    assigned: dict[int, str] = {}
    position = 0
    for kind, coin in zip(ROUND_FAULTS, coins, strict=True):
        expected = float(getattr(faults, kind)) * len(client_ids)
        count = math.floor(expected) + int(coin < expected - math.floor(expected))
        for index in order[position : position + count]:
            assigned[int(client_ids[index])] = kind
        position += count
    return assigned


def attack_update(result: ClientResult, kind: str, scale_factor: float = 10.0) -> ClientResult:
    """The reply a client with fault ``kind`` sends instead of its honest ``result``."""
    update = result.update
    if kind == "nan":
        update = torch.full_like(update, float("nan"))
    elif kind == "sign_flip":
        update = -update
    elif kind == "scale":
        update = update * scale_factor
    else:
        raise ValueError(f"fault {kind!r} changes no update; update faults are nan, sign_flip, scale")
    return dataclasses.replace(result, update=update)


def label_flip_clients(fraction: float, seed: int, num_clients: int) -> list[int]:
    """The fixed, seeded subset (round(fraction · N) clients) that trains on flipped labels."""
    count = round(fraction * num_clients)
    chosen = numpy_rng(seed, "faults", 0).choice(num_clients, size=count, replace=False)
    return sorted(int(c) for c in chosen)


def flip_labels(data: ArrayDataset, num_classes: int) -> ArrayDataset:
    """The same inputs with every label y replaced by C − 1 − y."""
    return ArrayDataset(data.x, (num_classes - 1) - data.y)


def poison_labels(data: FederatedDataset, client_ids: Sequence[int]) -> FederatedDataset:
    """A copy of ``data`` in which the listed clients' labels are flipped (test sets untouched)."""
    flipped = set(client_ids)
    clients = [flip_labels(c, data.num_classes) if i in flipped else c for i, c in enumerate(data.clients)]
    return dataclasses.replace(data, clients=clients)
