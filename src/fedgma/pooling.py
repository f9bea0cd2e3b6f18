"""2×2 max pooling with PyTorch's exact results, faster on the CPU path the simulator runs.

With one thread, ``F.max_pool2d`` on a channels-first CPU tensor visits every window element by
element: in the FedAvg CNN (:func:`fedgma.models.cnn`) its forward pass took about a fifth of a
training step (18-19% in two ``torch.profiler`` runs of a batch-32 step). :class:`MaxPool2x2` computes
the same numbers with ``max_pool2d`` of a channels-last copy: a kernel vectorized over channels, with
the same scan order and tie rule (the first maximum of the window in row-major order, so -0.0 before
0.0 gives -0.0; a NaN wins). With autograd, the backward pass writes ``0 + grad`` at each window's
argmax, as PyTorch's backward does (the windows do not overlap, so each input receives at most one
gradient).

Values and gradients are bit-identical to ``nn.MaxPool2d(2)`` (``tests/test_pooling.py``);
rows and columns past the last full window are dropped, as ``nn.MaxPool2d(2)`` drops them. On other
devices, for other dtypes and layouts, and under ``torch.func`` transforms (the vectorized backend), it
is ``F.max_pool2d`` itself (see :class:`MaxPool2x2`).
Measured by ``python benchmarks/bench.py --parts train,eval --models cnn,cnn-maxpool2d`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaxPool2x2"]


class _MaxPool2x2(torch.autograd.Function):
    """``max_pool2d(x, 2)`` through a channels-last copy; backward scatters ``0 + grad`` to the argmax,
    forward-mode AD gathers the tangent there (as PyTorch's formulas for ``max_pool2d_with_indices`` do)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y, index = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
        index = index.contiguous()  # the argmax's flat position h·W + w in its (n, c) plane
        ctx.save_for_backward(index)
        ctx.save_for_forward(index)
        ctx.input_shape = x.shape
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_input = grad.new_zeros(n, c, h * w)
        # + 0.0 turns -0.0 into 0.0, as PyTorch's 0 + grad does
        grad_input.scatter_(2, index.view(n, c, -1), (grad + 0.0).contiguous().view(n, c, -1))
        return grad_input.view(n, c, h, w)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        flat = tangent.contiguous().view(n, c, h * w)
        return flat.gather(2, index.view(n, c, -1)).view(index.shape)


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` (kernel 2, stride 2, no padding, floor) on (N, C, H, W) or (C, H, W) inputs.

    Returns (N, C, H // 2, W // 2) (or (C, H // 2, W // 2)), bit-identical to ``nn.MaxPool2d(2)`` in values,
    gradients and forward-mode derivatives; only the speed on CPU differs (see the module docstring). The
    fast path takes contiguous non-empty float32 and float64 (N, C, H, W) CPU tensors outside ``torch.func``
    transforms; every other input goes to ``F.max_pool2d`` itself (and gets its errors, e.g. ``RuntimeError``
    for an input smaller than a window). One difference remains: a second derivative with respect to the
    input raises (the input is not in the backward's graph) where PyTorch returns zeros; second derivatives
    with respect to the upstream gradient are the same.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or x.dtype not in (torch.float32, torch.float64)
                or x.numel() == 0 or min(x.shape[-2:]) < 2 or not x.is_contiguous()
                or torch._C._are_functorch_transforms_active()):  # vmap, grad, ...: their tensors included
            return F.max_pool2d(x, 2)
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool2x2.apply(x)
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()
