"""fedgma.pooling.MaxPool2x2 gives nn.MaxPool2d(2)'s bits: values, tie rule, signed zeros, NaN, gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from fedgma.models import build_model
from fedgma.pooling import MaxPool2x2

_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as bit patterns (NaN equals NaN, -0.0 differs from 0.0)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(_INT[a.element_size()]), b.contiguous().view(_INT[b.element_size()])))


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values in {-2, ..., 2} after a ReLU (ties everywhere, and relu(-0.0) = -0.0), some -0.0, some NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    x[torch.rand(shape, generator=g) < 0.2] = -0.0
    x = torch.relu(x)
    x.view(-1)[torch.randperm(x.numel(), generator=g)[:2]] = float("nan")
    return x


SHAPES = [(4, 3, 8, 8), (2, 5, 9, 11), (1, 1, 2, 2), (3, 2, 3, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_without_autograd_is_max_pool2d(shape, dtype) -> None:
    x = _inputs(shape, dtype, 0)
    with torch.no_grad():
        assert _same_bits(MaxPool2x2()(x), nn.MaxPool2d(2)(x))
    with torch.inference_mode():
        assert _same_bits(MaxPool2x2()(x), nn.MaxPool2d(2)(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("nan", [False, True])
def test_forward_and_gradient_with_autograd_are_max_pool2d(shape, dtype, nan) -> None:
    x = _inputs(shape, dtype, 1)
    if not nan:
        x = torch.nan_to_num(x, nan=1.0)
    out_shape = (*shape[:2], shape[2] // 2, shape[3] // 2)
    g = torch.randint(-2, 3, out_shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    g.view(-1)[::3] = -0.0  # PyTorch's backward writes 0 + grad: -0.0 arrives as 0.0
    results = []
    for pool in (MaxPool2x2(), nn.MaxPool2d(2)):
        leaf = x.clone().requires_grad_()
        y = pool(leaf)
        y.backward(g)
        results.append((y.detach(), leaf.grad))
    (y, dx), (y_ref, dx_ref) = results
    assert _same_bits(y, y_ref)
    assert _same_bits(dx, dx_ref)


def test_an_input_smaller_than_a_window_raises_as_max_pool2d_does() -> None:
    x = torch.rand(3, 2, 1, 7)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        nn.MaxPool2d(2)(x)
    with pytest.raises(RuntimeError, match="Output size is too small"):
        MaxPool2x2()(x)


def _pooled_tensors(monkeypatch) -> list[int]:
    """Spy on F.max_pool2d: the data pointer of every tensor it pools (the fast path pools a copy)."""
    calls: list[int] = []
    original = torch.nn.functional.max_pool2d

    def spy(x, *args, **kwargs):
        calls.append(x.data_ptr())
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "max_pool2d", spy)
    return calls


def test_the_fast_paths_are_taken_on_cpu(monkeypatch) -> None:
    """The tests above would pass if MaxPool2x2 always fell back to F.max_pool2d: check it does not."""
    calls = _pooled_tensors(monkeypatch)
    x = torch.rand(2, 3, 4, 4)
    with torch.no_grad():
        assert MaxPool2x2()(x).shape == (2, 3, 2, 2)
    assert MaxPool2x2()(x.requires_grad_()).shape == (2, 3, 2, 2)
    assert len(calls) == 2 and x.data_ptr() not in calls


@pytest.mark.parametrize("case", ["bfloat16", "float16", "empty", "channels_last", "sliced", "3d"])
def test_other_inputs_fall_back_to_max_pool2d(monkeypatch, case) -> None:
    """Inputs the fast path was not checked on go to F.max_pool2d itself: same bits, layout and gradients."""
    x = {"bfloat16": torch.rand(1, 16, 2, 2).bfloat16(), "float16": torch.rand(2, 3, 4, 4).half(),
         "empty": torch.rand(0, 3, 8, 8), "channels_last": torch.rand(2, 3, 4, 4).to(memory_format=torch.channels_last),
         "sliced": torch.rand(2, 3, 8, 8), "3d": torch.rand(3, 4, 4)}[case]
    if case == "bfloat16":
        x[:, :, 0, 0] = float("nan")  # PyTorch's vectorized channels-last bfloat16 kernel writes another NaN
    calls = _pooled_tensors(monkeypatch)
    results, pooled = [], []
    for pool in (MaxPool2x2(), nn.MaxPool2d(2)):
        leaf = x.clone().requires_grad_()
        inputs = leaf[:, :, ::2] if case == "sliced" else leaf
        pooled.append(inputs.data_ptr())
        y = pool(inputs)
        y.sum().backward()
        results.append((y, leaf.grad))
    (y, dx), (y_ref, dx_ref) = results
    assert calls == pooled  # F.max_pool2d got the input itself, not a copy
    assert _same_bits(y.detach(), y_ref.detach()) and y.stride() == y_ref.stride()
    assert _same_bits(dx, dx_ref)


def test_a_captured_input_under_vmap_falls_back() -> None:
    """A torch.func transform is active but the pooled tensor is a plain leaf captured from outside."""
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = [torch.func.vmap(lambda s, pool=pool: pool(x).sum() * s)(torch.arange(3.0))
           for pool in (MaxPool2x2(), nn.MaxPool2d(2))]
    assert _same_bits(out[0].detach(), out[1].detach())


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's forward AD
def test_forward_mode_derivative_is_max_pool2d() -> None:
    import torch.autograd.forward_ad as fwAD

    x = _inputs((2, 3, 6, 6), torch.float32, 4)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    tangents = []
    for pool in (MaxPool2x2(), nn.MaxPool2d(2)):
        with fwAD.dual_level():
            y = pool(fwAD.make_dual(x.clone().requires_grad_(), tangent))
            tangents.append(fwAD.unpack_dual(y).tangent.clone())
    assert _same_bits(tangents[0], tangents[1])


def test_under_vmap_and_grad_it_is_max_pool2d() -> None:
    """torch.func (the vectorized backend) sees nn.MaxPool2d's forward and its gradients."""
    x = torch.randn(3, 2, 4, 6, 6)

    def loss(pool: nn.Module):
        return lambda t: (pool(t) ** 2).sum()

    assert _same_bits(vmap(grad(loss(MaxPool2x2())))(x), vmap(grad(loss(nn.MaxPool2d(2))))(x))


def test_cnn_step_matches_max_pool2d() -> None:
    """One training step and one evaluation of the CNN: the same bits with either pool."""
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % 10
    models = [build_model("cnn", (1, 28, 28), 10, torch.Generator().manual_seed(0)) for _ in range(2)]
    models[1][2], models[1][5] = nn.MaxPool2d(2), nn.MaxPool2d(2)
    assert isinstance(models[0][2], MaxPool2x2)
    grads = []
    for model in models:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.view(-1) for p in model.parameters()]))
        with torch.no_grad():
            grads.append(model(x))
    assert _same_bits(grads[0], grads[2])
    assert _same_bits(grads[1], grads[3])
