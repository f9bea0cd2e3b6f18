"""The MLP gradient without autograd gives the same bits as autograd, and only takes the models it can."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedgma import fastgrad
from fedgma.client import LocalSGD, batch_schedule, train_client
from fedgma.data.arrays import ArrayDataset
from fedgma.fastgrad import MLPGradient, mlp_layers
from fedgma.models import FlatModel, build_model


def _model(name: str, shape: tuple[int, ...], classes: int, dtype=torch.float32) -> nn.Module:
    return build_model(name, shape, classes, torch.Generator().manual_seed(0)).to(dtype)


def _autograd(module: nn.Module, x, y):
    module.zero_grad(set_to_none=True)
    loss = F.cross_entropy(module(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in module.parameters()]


def _fast(module: nn.Module, x, y):
    module.zero_grad(set_to_none=True)
    loss = MLPGradient(mlp_layers(module)).loss_and_backward(x, y)
    return loss, [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [("mlp", (1, 28, 28), 10), ("mlp", (60,), 10), ("logreg", (60,), 10), ("logreg", (1, 8, 8), 3)],
)
@pytest.mark.parametrize("batch", [1, 7, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradients_are_bit_identical_to_autograd(name, shape, classes, batch, dtype):
    module = _model(name, shape, classes, dtype)
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *shape, generator=generator, dtype=dtype) * 3
    y = torch.randint(0, classes, (batch,), generator=generator)
    loss, grads = _autograd(module, x, y)
    fast_loss, fast_grads = _fast(module, x, y)
    assert torch.equal(loss, fast_loss)
    assert len(grads) == len(fast_grads)
    for expected, got in zip(grads, fast_grads, strict=True):
        assert torch.equal(expected, got)


def test_gradients_accumulate_into_existing_grads_like_autograd():
    module = _model("mlp", (20,), 4)
    x, y = torch.randn(5, 20), torch.tensor([0, 1, 2, 3, 0])
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    F.cross_entropy(module(x), y).backward()
    expected = [p.grad.clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = torch.full_like(p, 0.5)
    MLPGradient(mlp_layers(module)).loss_and_backward(x, y)
    assert all(torch.equal(e, p.grad) for e, p in zip(expected, module.parameters(), strict=True))


@pytest.mark.parametrize(
    "module",
    [
        build_model("cnn", (1, 28, 28), 10, torch.Generator().manual_seed(0)),
        nn.Sequential(nn.Linear(4, 3)),  # no Flatten: Linear would act on the last dim of a 3-D input
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3, bias=False)),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)),
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()),  # ends in ReLU
        nn.Sequential(nn.Flatten(0), nn.Linear(4, 3)),
        nn.Linear(4, 3),
    ],
)
def test_only_plain_mlps_take_the_fast_path(module):
    assert mlp_layers(module) is None
    assert not FlatModel(module).fast_backward


@pytest.mark.parametrize(
    "settings",
    [LocalSGD(epochs=2, batch_size=16, lr=0.05),
     LocalSGD(steps=9, batch_size=8, lr=0.02, momentum=0.9, weight_decay=1e-3, prox_mu=0.1)],
)
def test_train_client_gives_the_same_update_with_and_without_autograd(settings):
    generator = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(50, 1, 6, 6, generator=generator), torch.randint(0, 5, (50,), generator=generator))
    module = _model("mlp", (1, 6, 6), 5)
    start = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    correction = torch.randn(start.numel(), generator=generator) * 0.01
    results = []
    for fast in (True, False):
        model = FlatModel(_model("mlp", (1, 6, 6), 5), fast_backward=fast)
        assert model.fast_backward is fast
        results.append(train_client(model, start, data, settings, torch.Generator().manual_seed(7), correction))
    assert torch.equal(results[0].update, results[1].update)
    assert results[0].train_loss == results[1].train_loss
    assert results[0].update.abs().sum() > 0


def test_autograd_models_get_the_bits_of_zeroing_and_accumulating():
    """For models autograd differentiates, loss_and_backward writes fresh gradients as g + 0 into the flat
    vector: the bits of the classic zero_grad() + backward() accumulation (0 + g), -0.0 included."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(40, 1, 12, 12, generator=generator)
    data = ArrayDataset(x, torch.randint(0, 4, (40,), generator=generator))
    settings = LocalSGD(steps=6, batch_size=8, lr=0.05, momentum=0.5, weight_decay=1e-3)
    start = FlatModel(_model("cnn", (1, 12, 12), 4)).params.clone()
    new = FlatModel(_model("cnn", (1, 12, 12), 4))
    assert not new.fast_backward
    result = train_client(new, start, data, settings, torch.Generator().manual_seed(5))
    new.check_views()

    classic = FlatModel(_model("cnn", (1, 12, 12), 4))  # the loop as it was: zero, accumulate, step
    classic.load(start)
    velocity = torch.zeros_like(classic.params)
    for batch in batch_schedule(len(data), settings, torch.Generator().manual_seed(5)):
        classic.zero_grad()
        F.cross_entropy(classic(data.x[batch]), data.y[batch]).backward()
        with torch.no_grad():
            classic.grads.add_(classic.params, alpha=settings.weight_decay)
            velocity.mul_(settings.momentum).add_(classic.grads)
            classic.params.sub_(velocity, alpha=settings.lr)
    assert torch.equal(result.update, classic.params - start)
    assert result.update.abs().sum() > 0

    zero = torch.tensor([-0.0, 0.0, 1.5])
    out = torch.empty(3)
    torch.add(zero, 0.0, out=out)
    assert torch.equal(out.sign(), torch.tensor([0.0, 0.0, 1.0])) and not torch.signbit(out[0])  # -0 + 0 = +0


def test_a_parameter_without_gradient_gets_zeros():
    module = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    unused = nn.Linear(2, 2)
    module.add_module("unused", unused)  # not in the forward: autograd leaves its grad None
    module.forward = lambda x: module[3](module[2](module[1](module[0](x))))  # type: ignore[method-assign]
    model = FlatModel(module)
    model.grads.fill_(7.0)
    model.loss_and_backward(torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 1]))
    layer = {layer.name: layer for layer in model.layers}["unused.weight"]
    assert torch.equal(model.grads[layer.start : layer.start + layer.numel], torch.zeros(layer.numel))
    model.check_views()


# --------------------------------------------------------------------------------------------
# The guards around the private ATen operators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "expected"),
    [("2.13.0+cpu", True), ("2.4.1", True), ("2.3.1", False), ("2.14.0", False), ("3.0.0", False), ("dev", False)],
)
def test_the_fast_path_is_used_only_on_tested_torch_versions(version, expected):
    assert fastgrad.available(version) is expected


def test_the_fast_path_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FEDGMA_FASTGRAD", "0")
    assert not fastgrad.available()
    assert not FlatModel(_model("mlp", (1, 6, 6), 5)).fast_backward


def test_a_missing_private_operator_falls_back_to_autograd(monkeypatch):
    monkeypatch.setattr(fastgrad, "_PRIVATE_OPS", (*fastgrad._PRIVATE_OPS, "no_such_operator"))
    assert not fastgrad.available()
    assert not FlatModel(_model("mlp", (1, 6, 6), 5)).fast_backward


def test_a_fast_gradient_that_differs_from_autograd_is_dropped_on_the_first_step(monkeypatch, caplog):
    """If a torch version computed other bits, the first step's check catches it and the client's update
    is autograd's, bit for bit."""
    generator = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(40, 1, 6, 6, generator=generator), torch.randint(0, 5, (40,), generator=generator))
    settings = LocalSGD(batch_size=8, lr=0.05)
    start = FlatModel(_model("mlp", (1, 6, 6), 5)).params.clone()
    reference = train_client(FlatModel(_model("mlp", (1, 6, 6), 5), fast_backward=False), start, data, settings,
                             torch.Generator().manual_seed(7))
    original = MLPGradient.loss_and_backward

    def off_by_a_bit(self, x, y):
        loss = original(self, x, y)
        self.linears[0].bias.grad.mul_(1 + 2**-20)
        return loss

    monkeypatch.setattr(MLPGradient, "loss_and_backward", off_by_a_bit)
    model = FlatModel(_model("mlp", (1, 6, 6), 5))
    assert model.fast_backward
    result = train_client(model, start, data, settings, torch.Generator().manual_seed(7))
    assert not model.fast_backward
    assert "differs from autograd" in caplog.text
    assert torch.equal(result.update, reference.update) and result.train_loss == reference.train_loss
