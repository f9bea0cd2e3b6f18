"""2×2 max pooling with PyTorch's exact results, faster on the CPU path the simulator runs.

With one thread, ``F.max_pool2d`` on a channels-first CPU tensor visits every window element by
element: in the FedAvg CNN (:func:`fedgma.models.cnn`) its forward pass took 19% of a training step.
:class:`MaxPool2x2` computes the same numbers with ``max_pool2d`` of a channels-last copy: a kernel
vectorized over channels, with the same scan order and tie rule (the first maximum of the window in
row-major order, so -0.0 before 0.0 gives -0.0; a NaN wins). With autograd, the backward pass writes
``0 + grad`` at each window's argmax, as PyTorch's backward does (the windows do not overlap, so each
input receives at most one gradient).

Values and gradients are bit-identical to ``nn.MaxPool2d(2)`` (``tests/test_pooling.py``);
rows and columns past the last full window are dropped, as ``nn.MaxPool2d(2)`` drops them. On other
devices, and under ``torch.func`` transforms (the vectorized backend), it is ``nn.MaxPool2d(2)``.
Measured by ``python benchmarks/bench.py --parts train,eval --models cnn,cnn-maxpool2d`` (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaxPool2x2"]


class _MaxPool2x2(torch.autograd.Function):
    """``max_pool2d(x, 2)`` through a channels-last copy; backward scatters ``0 + grad`` to the argmax."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        y, index = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2, return_indices=True)
        ctx.save_for_backward(index)
        ctx.input_shape = x.shape
        return y.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        n, c, h, w = ctx.input_shape
        grad_input = grad.new_zeros(n, c, h * w)
        # index: the argmax's flat position h·W + w in its (n, c) plane; + 0.0 turns -0.0 into 0.0, as 0 + grad does
        grad_input.scatter_(2, index.contiguous().view(n, c, -1), (grad + 0.0).contiguous().view(n, c, -1))
        return grad_input.view(n, c, h, w)


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2)`` (kernel 2, stride 2, no padding) on (N, C, H, W) inputs, of any floating dtype.

    Returns (N, C, H // 2, W // 2), bit-identical to ``nn.MaxPool2d(2)`` in values and gradients; only
    the speed on CPU differs (see the module docstring).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or x.dim() != 4 or min(x.shape[-2:]) < 2
                or torch._C._functorch.is_functorch_wrapped_tensor(x)):
            return super().forward(x)  # and its errors, e.g. on an input smaller than a window
        if torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool2x2.apply(x)
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()
