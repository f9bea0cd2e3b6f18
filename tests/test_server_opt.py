"""Server optimizers against the update rules of Reddi et al. 2021, written out by hand."""

from __future__ import annotations

import pytest
import torch

from fedgma.server_opt import ServerAdagrad, ServerAdam, ServerSGD, ServerYogi, make_server_optimizer


def test_sgd_with_lr_one_is_fedavg():
    params = torch.tensor([1.0, -2.0, 3.0])
    update = torch.tensor([0.5, 0.25, -1.0])
    assert torch.equal(ServerSGD(lr=1.0).step(params, -update), params + update)


def test_sgd_momentum_is_heavy_ball():
    opt = ServerSGD(lr=0.5, momentum=0.9)
    params = torch.zeros(2)
    g1, g2 = torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5])
    params = opt.step(params, g1)
    assert torch.allclose(params, -0.5 * g1)
    params = opt.step(params, g2)
    assert torch.allclose(params, -0.5 * g1 - 0.5 * (0.9 * g1 + g2))


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_adaptive_rules_follow_reddi_et_al(kind):
    lr, b1, b2, eps = 0.1, 0.9, 0.99, 1e-3
    opt = make_server_optimizer(kind, lr=lr, beta1=b1, eps=eps, **({} if kind == "adagrad" else {"beta2": b2}))
    params = torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)
    m = torch.zeros(3, dtype=torch.float64)
    v = torch.full((3,), eps**2, dtype=torch.float64)
    expected = params.clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        grad = torch.randn(3, generator=g, dtype=torch.float64)
        m = b1 * m + (1 - b1) * grad
        if kind == "adam":
            v = b2 * v + (1 - b2) * grad**2
        elif kind == "yogi":
            v = v - (1 - b2) * grad**2 * torch.sign(v - grad**2)
        else:
            v = v + grad**2
        expected = expected - lr * m / (v.sqrt() + eps)
        params = opt.step(params, grad)
    assert torch.allclose(params, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [ServerAdam, ServerYogi, ServerAdagrad])
def test_state_dict_round_trip_resumes_exactly(cls):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=g) for _ in range(6)]
    straight = cls(lr=0.05)
    params = torch.zeros(5)
    for grad in grads:
        params = straight.step(params, grad)
    first = cls(lr=0.05)
    resumed_params = torch.zeros(5)
    for grad in grads[:3]:
        resumed_params = first.step(resumed_params, grad)
    second = cls(lr=0.05)
    second.load_state_dict(first.state_dict())
    for grad in grads[3:]:
        resumed_params = second.step(resumed_params, grad)
    assert torch.equal(params, resumed_params)


def test_momentum_state_round_trip():
    a = ServerSGD(lr=1.0, momentum=0.9)
    a.step(torch.zeros(2), torch.ones(2))
    b = ServerSGD(lr=1.0, momentum=0.9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.step(torch.zeros(2), torch.ones(2)), b.step(torch.zeros(2), torch.ones(2)))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: ServerSGD(lr=-1), "lr must be a finite number > 0"),
        (lambda: ServerSGD(lr=1, momentum=1.0), "momentum must lie in [0, 1)"),
        (lambda: ServerAdam(eps=0), "eps must be a finite number > 0"),
        (lambda: make_server_optimizer("lamb", lr=1), "unknown server optimizer 'lamb'"),
        (lambda: make_server_optimizer("adam", momentum=0.9), "server optimizer 'adam' has no option 'momentum'"),
        (lambda: make_server_optimizer("adagrad", beta2=0.9), "server optimizer 'adagrad' has no option 'beta2'"),
        (lambda: make_server_optimizer("sgd", lr=float("inf")), "server optimizer 'sgd' option 'lr'"),
    ],
)
def test_bad_settings_are_rejected(factory, message):
    with pytest.raises(ValueError) as error:
        factory()
    assert message in str(error.value)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="does not match parameter shape"):
        ServerSGD().step(torch.zeros(3), torch.zeros(4))
