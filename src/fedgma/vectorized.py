"""Vectorized local training: many sampled clients trained at once with ``torch.func.vmap``.

The per-step work of one client on a small model is small; on a GPU, training C clients at once
turns C small kernels into one batched kernel and pays the per-step launch overhead once instead of
C times. The batched gradient is ``vmap(grad_and_value(loss))`` over ``functional_call`` of the
model with each parameter stacked over the clients (``[C, *shape]``): no hand-written batched
forward pass, so any model ``functional_call`` can run works, and the local step is the one of
:func:`fedgma.client.train_client` (weight decay, FedProx, SCAFFOLD, momentum) applied to the stacks.

On a CPU this is no faster than the sequential backend (docs/PERFORMANCE.md): the batched products
cost about the same per client as separate ones, so use ``multiprocess`` there.

Every client replays exactly the batches of :func:`fedgma.client.batch_schedule` (same seeds as the
sequential backend). Clients are sorted by their number of local steps, longest first, so at step t
the clients still training are a *prefix* of the stacks: finished clients drop out of the
computation. A short batch is padded to the batch width and the padding gets per-sample weight 0,
the real samples weight 1/len(batch), so each client's weighted loss is the batch mean of the
sequential backend and its gradient is the same up to float rounding (batched kernels sum in
another order). Deterministic: no randomness beyond the per-client batch schedules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad_and_value, vmap

from fedgma.client import ClientAlgorithm, ClientResult, LocalSGD, batch_schedule
from fedgma.data.federated import FederatedDataset
from fedgma.models import FlatModel
from fedgma.seeding import torch_generator

__all__ = ["VectorizedBackend", "make_loss_grad", "train_clients_vectorized"]

# (stacked params of the active clients, x [n, B, ...], y [n, B], w [n, B]) -> (grads, losses [n])
LossGrad = Callable[[list[Tensor], Tensor, Tensor, Tensor], tuple[list[Tensor], Tensor]]


def make_loss_grad(model: FlatModel) -> LossGrad:
    """The batched gradient of ``model``'s weighted cross-entropy: ``vmap(grad_and_value(functional_call))``.

    The returned function takes the stacked parameters of n clients (each ``[n, *shape]``), inputs
    ``x`` ``[n, B, ...]``, labels ``y`` ``[n, B]`` (int64) and per-sample weights ``w`` ``[n, B]``, and
    returns each parameter's gradient (``[n, *shape]``) and the n weighted losses.
    """
    module, names = model.module, [layer.name for layer in model.layers]

    def loss(tensors: list[Tensor], x: Tensor, y: Tensor, w: Tensor) -> Tensor:
        logits = functional_call(module, dict(zip(names, tensors, strict=True)), (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum()

    batched = vmap(grad_and_value(loss))

    def loss_grad(params: list[Tensor], x: Tensor, y: Tensor, w: Tensor) -> tuple[list[Tensor], Tensor]:
        grads, losses = batched(params, x, y, w)
        return list(grads), losses.detach()

    return loss_grad


class _Plan:
    """The batches of C clients as step-major index/weight tensors, clients sorted by steps (longest first)."""

    def __init__(self, datasets: Sequence[Any], schedules: Sequence[list[Tensor]]) -> None:
        count = len(schedules)
        self.order = sorted(range(count), key=lambda j: -len(schedules[j]))  # stable: ties keep their order
        self.steps = [len(schedules[j]) for j in self.order]
        width = max(len(b) for s in schedules for b in s)
        device = datasets[0].x.device
        self.x = torch.cat([datasets[j].x for j in self.order])
        self.y = torch.cat([datasets[j].y for j in self.order])
        index = torch.zeros(self.steps[0], count, width, dtype=torch.long)
        weight = torch.zeros(self.steps[0], count, width, dtype=self.x.dtype)
        offset = 0
        for slot, j in enumerate(self.order):
            for t, batch in enumerate(schedules[j]):
                index[t, slot, : len(batch)] = batch.cpu() + offset
                index[t, slot, len(batch) :] = offset  # padding: any real sample, with weight 0
                weight[t, slot, : len(batch)] = 1.0 / len(batch)
            offset += len(datasets[j])
        self.index, self.weight = index.to(device), weight.to(device)
        # active[t]: how many clients (a prefix of the sorted stacks) still train at step t
        self.active = [sum(1 for s in self.steps if s > t) for t in range(self.steps[0])]


def train_clients_vectorized(
    model: FlatModel,
    global_params: Tensor,
    datasets: Sequence[Any],
    schedules: Sequence[list[Tensor]],
    settings: LocalSGD,
    corrections: Sequence[Tensor | None] | None = None,
    loss_grad: LossGrad | None = None,
) -> tuple[Tensor, list[float], list[int]]:
    """Local SGD of C clients at once from ``global_params``: the batched twin of ``train_client``.

    ``schedules[j]`` are client j's index batches (from ``batch_schedule``); ``corrections[j]`` is a
    constant added to client j's gradients (SCAFFOLD's c − c_i) or None. Returns
    ``(updates [C, d], mean train loss per client, local steps per client)`` in the order of ``datasets``.
    """
    loss_grad = loss_grad or make_loss_grad(model)
    plan = _Plan(datasets, schedules)
    count = len(schedules)
    global_params = global_params.detach()
    layers = model.layers
    shapes = [p.shape for p in model._parameters]
    globals_ = [global_params[layer.start : layer.start + layer.numel].view(s) for layer, s in zip(layers, shapes,
                                                                                                   strict=True)]
    stacks = [g.unsqueeze(0).repeat(count, *([1] * g.dim())) for g in globals_]  # each [C, *shape]
    velocity = [torch.zeros_like(s) for s in stacks] if settings.momentum > 0 else None
    correction = None
    if corrections is not None and any(c is not None for c in corrections):
        flat = torch.zeros(count, model.numel, dtype=global_params.dtype, device=global_params.device)
        for slot, j in enumerate(plan.order):
            if corrections[j] is not None:
                flat[slot] = corrections[j]
        correction = [flat[:, layer.start : layer.start + layer.numel].reshape(count, *s)
                      for layer, s in zip(layers, shapes, strict=True)]
    loss_sum = torch.zeros(count, dtype=global_params.dtype, device=global_params.device)
    for t, active in enumerate(plan.active):
        params = [s[:active] for s in stacks]
        index = plan.index[t, :active]
        grads, losses = loss_grad(params, plan.x[index], plan.y[index], plan.weight[t, :active])
        with torch.no_grad():
            loss_sum[:active] += losses
            if settings.weight_decay:
                torch._foreach_add_(grads, params, alpha=settings.weight_decay)
            if settings.prox_mu:
                torch._foreach_add_(grads, torch._foreach_sub(params, globals_), alpha=settings.prox_mu)
            if correction is not None:
                torch._foreach_add_(grads, [c[:active] for c in correction])
            step = grads
            if velocity is not None:
                step = [v[:active] for v in velocity]
                torch._foreach_mul_(step, settings.momentum)
                torch._foreach_add_(step, grads)
            torch._foreach_add_(params, step, alpha=-settings.lr)
    inverse = [0] * count
    for slot, j in enumerate(plan.order):
        inverse[j] = slot
    inverse_t = torch.tensor(inverse, device=global_params.device)
    updates = torch.cat([s.reshape(count, -1) for s in stacks], dim=1)[inverse_t].sub_(global_params)
    mean_losses = (loss_sum / torch.tensor(plan.steps, dtype=loss_sum.dtype, device=loss_sum.device))[inverse_t]
    return updates, mean_losses.tolist(), [plan.steps[inverse[j]] for j in range(count)]


class VectorizedBackend:
    """Train the round's clients in groups of ``max_clients`` as one batched computation.

    Same results as :class:`~fedgma.backends.SequentialBackend` to float tolerance for plain local
    SGD, FedProx, SCAFFOLD, momentum and weight decay. Memory: a few ``[group, d]`` stacks plus the
    group's data; lower ``max_clients`` for large models.
    """

    def __init__(
        self,
        model: FlatModel,
        data: FederatedDataset,
        settings: LocalSGD,
        seed: int,
        max_clients: int | None = None,
    ) -> None:
        if max_clients is not None and max_clients < 1:
            raise ValueError(f"backend option max_clients must be ≥ 1, got {max_clients}")
        self.model, self.data, self.settings, self.seed = model, data, settings, seed
        self.max_clients = max_clients
        self._loss_grad = make_loss_grad(model)

    def train(
        self, params: Tensor, client_ids: Sequence[int], round_index: int, algorithm: ClientAlgorithm
    ) -> Iterator[ClientResult]:
        ids = list(client_ids)
        group_size = self.max_clients or max(len(ids), 1)
        for start in range(0, len(ids), group_size):
            group = ids[start : start + group_size]
            datasets = [self.data.clients[c] for c in group]
            schedules = [
                batch_schedule(len(d), self.settings, torch_generator(self.seed, "client", round_index, c))
                for c, d in zip(group, datasets, strict=True)
            ]
            corrections = [algorithm.correction(c) for c in group]
            updates, losses, steps = train_clients_vectorized(
                self.model, params, datasets, schedules, self.settings, corrections, self._loss_grad
            )
            for j, client_id in enumerate(group):
                yield ClientResult(
                    client_id=client_id,
                    update=updates[j],
                    num_samples=len(datasets[j]),
                    num_steps=steps[j],
                    train_loss=losses[j],
                )
            del updates

    def close(self) -> None:
        pass
