"""Cross-entropy gradients of MLPs without autograd: the same ATen calls autograd makes, without its cost.

For small models the autograd engine (graph recording, node scheduling, gradient accumulation) is a
large share of a local SGD step: a third of a step of the 784-200-200-10 MLP at batch 32 on one CPU
core. An MLP (``Flatten``, then ``Linear`` layers with ``ReLU`` between them, as ``models.mlp`` and
``models.logreg`` build) has a backward pass of a few matrix products, so :class:`MLPGradient` calls
them directly: the ATen functions autograd's formulas call for ``addmm``, ``relu``, ``log_softmax``
and ``nll_loss``, with the same operand layouts, so the loss and every gradient are bit-identical to
``F.cross_entropy(module(x), y).backward()`` (tests/test_fastgrad.py checks it).

Three private ATen operators are called (``nll_loss_forward``/``nll_loss_backward``,
``_log_softmax_backward_data``, ``threshold_backward``), so the fast path is guarded: it is used only
on the torch versions it was tested with (:data:`TESTED_TORCH`) when those operators exist
(:func:`available`), and :class:`~fedgma.models.FlatModel` checks its first gradient against autograd
bit for bit, falling back to autograd for good if they differ. ``FEDGMA_FASTGRAD=0`` turns it off.
Either way the numbers are the same; only the speed differs (about 30% of an MLP step, see
docs/PERFORMANCE.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TESTED_TORCH", "MLPGradient", "available", "mlp_layers"]

TESTED_TORCH = ((2, 4), (2, 14))  # [lowest, highest): the versions the bit-identity tests ran on
_PRIVATE_OPS = ("nll_loss_forward", "nll_loss_backward", "_log_softmax_backward_data", "threshold_backward")

_aten = torch.ops.aten
_IGNORE_INDEX = -100  # F.cross_entropy's default
_MEAN = 1  # torch's Reduction::Mean


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def available(torch_version: str | None = None) -> bool:
    """Whether the fast gradient may be used: ``FEDGMA_FASTGRAD`` is not 0, this torch (or
    ``torch_version``) lies in :data:`TESTED_TORCH`, and the private operators it calls exist."""
    if os.environ.get("FEDGMA_FASTGRAD", "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    try:
        version = _version(torch_version or torch.__version__)
    except ValueError:
        return False
    if not (TESTED_TORCH[0] <= version < TESTED_TORCH[1]):
        return False
    return all(hasattr(_aten, name) for name in _PRIVATE_OPS)


def mlp_layers(module: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of ``Sequential(Flatten(), Linear, (ReLU, Linear)*)``, else None."""
    if type(module) is not nn.Sequential:
        return None
    children = list(module)
    if not children or type(children[0]) is not nn.Flatten or (children[0].start_dim, children[0].end_dim) != (1, -1):
        return None  # without the Flatten, Linear would act on the last dimension of a >2-D input
    children = children[1:]
    if len(children) % 2 == 0:  # Linear, then pairs of (ReLU, Linear)
        return None
    linears = children[0::2]
    relus = children[1::2]
    if not all(type(layer) is nn.Linear and layer.bias is not None for layer in linears):
        return None
    if not all(type(relu) is nn.ReLU for relu in relus):
        return None
    return linears  # type: ignore[return-value]


class MLPGradient:
    """``loss_and_backward(x, y)``: mean cross-entropy of an MLP; adds the gradients into ``.grad``."""

    def __init__(self, linears: Sequence[nn.Linear]) -> None:
        self.linears = list(linears)
        self._ones: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def _one(self, like: Tensor) -> Tensor:
        """d loss / d loss = 1 (what ``loss.backward()`` starts from), made once per dtype and device."""
        key = (like.dtype, like.device)
        if key not in self._ones:
            self._ones[key] = torch.ones((), dtype=like.dtype, device=like.device)
        return self._ones[key]

    @torch.no_grad()
    def loss_and_backward(self, x: Tensor, y: Tensor) -> Tensor:
        inputs: list[Tensor] = []  # each layer's input (mat1 of its addmm)
        activations: list[Tensor] = []  # each ReLU's output (what threshold_backward reads)
        h = x.flatten(1)
        last = len(self.linears) - 1
        for i, layer in enumerate(self.linears):
            inputs.append(h)
            h = torch.addmm(layer.bias, h, layer.weight.t())  # F.linear on a 2-D input
            if i < last:
                h = torch.relu(h)
                activations.append(h)
        log_probs = torch.log_softmax(h, 1)
        loss, total_weight = _aten.nll_loss_forward(log_probs, y, None, _MEAN, _IGNORE_INDEX)
        grad = _aten.nll_loss_backward(self._one(loss), log_probs, y, None, _MEAN, _IGNORE_INDEX, total_weight)
        grad = _aten._log_softmax_backward_data(grad, log_probs, 1, log_probs.dtype)
        for i in range(last, -1, -1):
            layer = self.linears[i]
            # addmm's backward for mat2 = weight.t(), a column-major operand: (grad.t() @ mat1).t(),
            # which the transpose's backward turns back into grad.t() @ mat1; the bias gets grad.sum(0).
            _accumulate_product(layer.weight, grad.t(), inputs[i])
            _accumulate(layer.bias, grad.sum(0))
            if i > 0:
                grad = torch.mm(grad, layer.weight)  # addmm's backward for mat1: grad @ mat2.t()
                grad = _aten.threshold_backward(grad, activations[i - 1], 0)
        return loss


def _accumulate_product(parameter: Tensor, left: Tensor, right: Tensor) -> None:
    """``parameter.grad += left @ right`` in one GEMM (beta = 1): the product is formed, then added once,
    as ``_accumulate(parameter, torch.mm(left, right))`` would, without the temporary and its extra pass."""
    if parameter.grad is None:
        parameter.grad = torch.mm(left, right)
    else:
        parameter.grad.addmm_(left, right)


def _accumulate(parameter: Tensor, gradient: Tensor) -> None:
    """``parameter.grad += gradient``, as autograd's AccumulateGrad does into an existing gradient."""
    if parameter.grad is None:
        parameter.grad = gradient
    else:
        parameter.grad.add_(gradient)
