"""GMA (and plain averaging) on whole PyTorch models: a list of ``state_dict()``s in, one out.

For library users with their own training loop: each client's *update* (``new − old`` or any
per-client tensors of the same structure) is given as a state dict; the floating-point tensors are
flattened in key order into one vector per client, aggregated by :func:`fedgma.aggregation.gma` (or
:func:`~fedgma.aggregation.mean`) and cut back into a state dict of the original shapes and dtypes.
Entries that are not floating point (BatchNorm's ``num_batches_tracked`` and other integer counters)
are never pushed through a sign: they are taken from the first state dict unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedgma.aggregation import gma, mean

__all__ = ["flatten_state_dict", "gma_state_dicts", "mean_state_dicts", "unflatten_state_dict"]

StateDict = Mapping[str, Tensor]


def _float_keys(state: StateDict) -> list[str]:
    return [k for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()]


def flatten_state_dict(state: StateDict, keys: Sequence[str] | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """The floating-point entries of ``state`` (or ``keys``, in that order) as one 1-D tensor [d].

    ``dtype`` defaults to that of the first entry; every entry is cast to it. Raises ``ValueError`` when
    there is no floating-point entry, or ``KeyError`` naming a missing key.
    """
    keys = list(_float_keys(state) if keys is None else keys)
    if not keys:
        raise ValueError("state dict has no floating-point tensor to aggregate")
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"state dict lacks {missing[0]!r}")
    dtype = dtype or state[keys[0]].dtype
    return torch.cat([state[k].detach().reshape(-1).to(dtype) for k in keys])


def unflatten_state_dict(vector: Tensor, like: StateDict, keys: Sequence[str] | None = None) -> dict[str, Tensor]:
    """Cut the 1-D ``vector`` back into ``like``'s floating-point entries (shapes and dtypes of ``like``);
    the other entries of ``like`` are copied over. Raises ``ValueError`` when the sizes do not match."""
    keys = list(_float_keys(like) if keys is None else keys)
    total = sum(like[k].numel() for k in keys)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"vector has shape {tuple(vector.shape)}, expected ({total},) for the state dict's entries")
    out: dict[str, Tensor] = OrderedDict()
    offset = 0
    chosen = set(keys)
    sizes = {k: like[k].numel() for k in keys}
    for key, value in like.items():
        if key in chosen:
            n = sizes[key]
            out[key] = vector[offset:offset + n].reshape(value.shape).to(value.dtype).clone()
            offset += n
        else:
            out[key] = value.clone() if isinstance(value, Tensor) else value
    return out


def _stack(states: Sequence[StateDict]) -> tuple[list[str], list[Tensor]]:
    if not states:
        raise ValueError("cannot aggregate: no client state dict (empty list)")
    keys = _float_keys(states[0])
    for k, state in enumerate(states[1:], 1):
        if _float_keys(state) != keys:
            extra = sorted(set(_float_keys(state)) ^ set(keys))
            raise ValueError(f"client {k}: state dict keys differ from client 0's"
                             + (f" (in {extra[0]!r})" if extra else " (order)"))
        for key in keys:
            if state[key].shape != states[0][key].shape:
                raise ValueError(f"client {k}: {key!r} has shape {tuple(state[key].shape)}, "
                                 f"expected {tuple(states[0][key].shape)} like client 0")
    dtype = torch.promote_types(torch.float32, states[0][keys[0]].dtype) if keys else torch.float32
    return keys, [flatten_state_dict(s, keys, dtype) for s in states]


def gma_state_dicts(
    states: Sequence[StateDict],
    weights: Sequence[float] | None = None,
    threshold: float = 0.4,
    hard: bool = False,
    weighted_agreement: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Gradient Masked Averaging (Tenison et al., TMLR 2023) of K clients' updates given as state dicts.

    Args:
        states: K state dicts of the same keys and shapes (each a client's update Δ_k, e.g.
            ``new_model.state_dict()[k] - global_model.state_dict()[k]`` for every k).
        weights: K non-negative weights, usually each client's number of training samples n_k;
            normalised to p_k = n_k / Σ n_k (uniform when None).
        threshold, hard, weighted_agreement: as in :func:`fedgma.aggregation.gma`.

    Returns:
        ``(aggregate, mask)``: two state dicts with the keys, shapes and dtypes of ``states[0]``; the
        aggregate is m ⊙ Σ p_k Δ_k and the mask m in [0, 1] per entry. Non-floating-point entries are
        copied from ``states[0]`` into both.

    Raises:
        ValueError: no state dict, differing keys or shapes, a NaN or infinite entry, bad weights, or
        a threshold outside [0, 1] (the messages of :func:`fedgma.aggregation.gma`, naming the client).
    """
    keys, vectors = _stack(states)
    aggregate, mask = gma(vectors, weights, threshold=threshold, hard=hard, weighted_agreement=weighted_agreement)
    return unflatten_state_dict(aggregate, states[0], keys), unflatten_state_dict(mask, states[0], keys)


def mean_state_dicts(states: Sequence[StateDict], weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """The weighted average Σ p_k Δ_k of K state dicts (FedAvg, McMahan et al. 2017), p_k = n_k / Σ n_k;
    keys, shapes, dtypes and errors as in :func:`gma_state_dicts`."""
    keys, vectors = _stack(states)
    return unflatten_state_dict(mean(vectors, weights), states[0], keys)
