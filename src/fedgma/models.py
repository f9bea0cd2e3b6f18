"""Models used in the FL literature, and a flat-parameter view of any model.

Models are built deterministically from a ``torch.Generator`` (no global random state). None has
non-trainable buffers (no BatchNorm; the ResNet uses GroupNorm, as FL papers usually do since
batch statistics do not average well across heterogeneous clients), so the whole model state is
one flat parameter vector.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedgma import fastgrad
from fedgma.aggregation import Layer
from fedgma.pooling import MaxPool2x2
from fedgma.registry import MODELS, NoOptions

__all__ = ["FlatModel", "available_models", "build_model", "init_parameters"]

log = logging.getLogger(__name__)


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (200, 200)) -> nn.Module:
    """The MLP of McMahan et al. 2017 (784-200-200-10 on 28×28 inputs)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The FedAvg CNN of McMahan et al. 2017: two 5×5 convs (32, 64) each with 2×2 max-pool, fc 512, fc.

    The pools are :class:`fedgma.pooling.MaxPool2x2`: ``nn.MaxPool2d(2)``'s results, faster on CPU.
    """
    channels, height, width = _image_shape(input_shape)
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2),
        nn.ReLU(),
        MaxPool2x2(),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.ReLU(),
        MaxPool2x2(),
        nn.Flatten(),
        nn.Linear(flat, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def logreg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the convex model of FedProx's Synthetic experiments)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    """A small ResNet (3 stages of 2 basic blocks, widths w/2w/4w) with GroupNorm instead of BatchNorm."""
    channels, _, _ = _image_shape(input_shape)
    blocks: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1, bias=False), nn.GroupNorm(2, width), nn.ReLU()]
    cin = width
    for stage, cout in enumerate((width, 2 * width, 4 * width)):
        for block in range(2):
            blocks.append(_BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
            cin = cout
    blocks += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*blocks)


def _image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"this model needs image inputs [C, H, W], got input shape {input_shape}")
    return input_shape  # type: ignore[return-value]


MODELS.register("mlp", mlp, NoOptions, "two hidden layers of 200 ReLU units (McMahan et al. 2017)")
MODELS.register("cnn", cnn, NoOptions, "two 5x5 conv layers + 512 dense (McMahan et al. 2017)")
MODELS.register("logreg", logreg, NoOptions, "multinomial logistic regression")
MODELS.register("resnet", resnet, NoOptions, "a small ResNet with GroupNorm")


def available_models() -> list[str]:
    """Names of every registered model (``model.name`` in a config), sorted."""
    return MODELS.names()


@torch.no_grad()
def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every parameter as PyTorch's defaults do, but from ``generator``."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_uniform_(sub.weight, a=math.sqrt(5), generator=generator)
            if sub.bias is not None:
                fan_in = sub.weight[0].numel()
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
                nn.init.uniform_(sub.bias, -bound, bound, generator=generator)
        elif isinstance(sub, nn.GroupNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, generator: torch.Generator) -> nn.Module:
    """Build the registered model ``name`` for inputs of ``input_shape`` (one example, e.g. [1, 28, 28])
    and ``num_classes`` outputs, its parameters drawn from ``generator``.

    Raises:
        ValueError: an unknown model (with a did-you-mean), or inputs the model cannot take.
    """
    model = MODELS.build(name, {}, input_shape=tuple(input_shape), num_classes=num_classes)
    init_parameters(model, generator)
    return model


class FlatModel:
    """A model whose parameters and gradients are views into two flat vectors.

    Loading a global model is one copy into ``params``; a local SGD step and the client update
    Δ = θ_local − θ_global are a few whole-vector operations, with no per-layer Python loops.
    Gradients accumulate in place into ``grads`` (as DDP's gradient-as-bucket-view does).

    ``fast_backward``: compute MLP gradients without autograd (:mod:`fedgma.fastgrad`, same bits)
    where :func:`fedgma.fastgrad.available` says so (None, the default) or never (False).
    """

    def __init__(
        self, module: nn.Module, device: torch.device | str = "cpu", fast_backward: bool | None = None
    ) -> None:
        module.to(device)
        if any(b.is_floating_point() for b in module.buffers()):
            raise ValueError("models with floating-point buffers (e.g. BatchNorm) are not supported; use GroupNorm")
        self.module = module
        parameters = [p for p in module.parameters() if p.requires_grad]
        self.layers: list[Layer] = []
        start = 0
        names = {id(p): n for n, p in module.named_parameters()}
        for p in parameters:
            self.layers.append(Layer(names[id(p)], start, p.numel()))
            start += p.numel()
        self.numel = start
        self.params = torch.empty(start, device=device, dtype=parameters[0].dtype)
        self.grads = torch.zeros_like(self.params)
        for p, layer in zip(parameters, self.layers, strict=True):
            view = slice(layer.start, layer.start + layer.numel)
            self.params[view].copy_(p.detach().reshape(-1))
            p.data = self.params[view].view_as(p)
            p.grad = self.grads[view].view_as(p)
        self._parameters = parameters
        self._grad_views = [p.grad for p in parameters]
        use_fast = fastgrad.available() if fast_backward is None else fast_backward and fastgrad.available()
        linears = fastgrad.mlp_layers(module) if use_fast else None
        self._fast_gradient = fastgrad.MLPGradient(linears) if linears is not None else None
        self._fast_checked = False

    @property
    def fast_backward(self) -> bool:
        """Whether ``loss_and_backward`` skips autograd (MLPs; same bits, see ``fedgma.fastgrad``)."""
        return self._fast_gradient is not None

    def loss_and_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of the model on ``(x, y)``; ``grads`` is set to its gradient.

        The same bits as zeroing ``grads`` and letting autograd accumulate into it (``0 + g``), but
        without the d-sized zeroing and read-modify-write when autograd runs: the fresh gradients
        are written into the flat vector as ``g + 0``, which is ``0 + g`` exactly (also for -0.0).
        """
        if self._fast_gradient is not None:
            if not self._fast_checked:
                return self._check_fast_gradient(x, y)
            self.grads.zero_()
            return self._fast_gradient.loss_and_backward(x, y)
        return self._autograd_loss_and_backward(x, y)

    def _check_fast_gradient(self, x: Tensor, y: Tensor) -> Tensor:
        """First step: the fast gradient must equal autograd's bit for bit, else autograd from now on."""
        self._fast_checked = True
        loss = self._autograd_loss_and_backward(x, y)
        expected = self.grads.clone()
        self.grads.zero_()
        fast_loss = self._fast_gradient.loss_and_backward(x, y)  # type: ignore[union-attr]
        if not (torch.equal(fast_loss, loss) and torch.equal(self.grads, expected)):
            log.warning("fedgma.fastgrad differs from autograd on torch %s; using autograd", torch.__version__)
            self._fast_gradient = None
            self.grads.copy_(expected)
        return loss

    def _autograd_loss_and_backward(self, x: Tensor, y: Tensor) -> Tensor:
        for p in self._parameters:
            p.grad = None
        loss = F.cross_entropy(self.module(x), y)
        loss.backward()
        for p, view in zip(self._parameters, self._grad_views, strict=True):
            if p.grad is None:  # a parameter the loss does not depend on
                view.zero_()
            else:
                torch.add(p.grad, 0.0, out=view)
            p.grad = view
        return loss.detach()

    def load(self, flat: Tensor) -> None:
        """Copy a flat parameter vector into the model (a copy: the model never aliases ``flat``)."""
        self.params.copy_(flat)

    def zero_grad(self) -> None:
        self.grads.zero_()

    def check_views(self) -> None:
        """Raise if autograd replaced a gradient tensor instead of accumulating into ``grads``."""
        for p, layer in zip(self._parameters, self.layers, strict=True):
            if p.grad is None or p.grad.data_ptr() != self.grads[layer.start :].data_ptr():
                raise RuntimeError(f"gradient of {layer.name} is no longer a view of the flat gradient")

    def __call__(self, x: Tensor) -> Tensor:
        return self.module(x)
