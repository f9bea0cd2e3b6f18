"""The shared test suite of server optimizers, parametrised over every registered one.

Modelled on optax's common optimizer tests: every optimizer in ``fedgma.registry.SERVER_OPTIMIZERS``
(with its defaults and the option sets in ``VARIANTS``) is checked for the same properties, so an
optimizer registered tomorrow is tested without editing this file. Trajectories are compared bit
for bit: resuming from a checkpoint must give exactly the numbers of an uninterrupted run.
"""

from __future__ import annotations

import io

import pytest
import torch

from fedgma.registry import SERVER_OPTIMIZERS
from fedgma.server_opt import make_server_optimizer

NAMES = SERVER_OPTIMIZERS.names()

# Option sets each optimizer is tested with besides its defaults ({}): the ones that give it state.
VARIANTS: dict[str, list[dict]] = {
    "sgd": [{}, {"momentum": 0.9}, {"lr": 0.5, "momentum": 0.5}],
    "adam": [{}, {"lr": 0.1, "beta1": 0.0}],
}
CASES = [pytest.param(name, options, id=f"{name}{options or ''}") for name in NAMES
         for options in VARIANTS.get(name, [{}])]
D = 257


def pseudo_gradients(seed: int, steps: int, dtype=torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(D, generator=generator, dtype=dtype) * (1 + i % 3) for i in range(steps)]


def trajectory(optimizer, params: torch.Tensor, grads: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for g in grads:
        params = optimizer.step(params, g)
        out.append(params)
    return out


def through_bytes(state: dict) -> dict:
    """The state as a checkpoint stores it: torch.save to bytes and back (weights_only, as checkpoints load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_the_variants_name_registered_optimizers_and_valid_options():
    assert {"sgd", "adam", "yogi", "adagrad"} <= set(NAMES)
    for name, variants in VARIANTS.items():
        assert name in NAMES
        for options in variants:
            SERVER_OPTIMIZERS.validate(name, options)


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(2))
def test_state_round_trip_mid_run_gives_the_identical_trajectory(name, options, dtype, seed):
    grads = pseudo_gradients(seed, 10, dtype)
    start = torch.randn(D, generator=torch.Generator().manual_seed(100 + seed), dtype=dtype)
    uninterrupted = trajectory(make_server_optimizer(name, **options), start, grads)

    first = make_server_optimizer(name, **options)
    head = trajectory(first, start, grads[:5])
    state = first.state_dict()
    saved = through_bytes(state)
    trajectory(first, head[-1], grads[5:])  # the saved state must not follow the optimizer it came from
    resumed = make_server_optimizer(name, **options)
    resumed.load_state_dict(saved)
    tail = trajectory(resumed, head[-1], grads[5:])
    for step, (a, b) in enumerate(zip(uninterrupted, head + tail, strict=True), 1):
        assert torch.equal(a, b), f"{name} {options}: step {step} differs after a round trip at step 5"
    assert same_state(state, saved), f"{name}: state_dict() shares tensors with the optimizer (it moved on)"


def same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    return a == b


@pytest.mark.parametrize(("name", "options"), CASES)
def test_a_fresh_state_round_trips_too(name, options):
    grads = pseudo_gradients(7, 4)
    start = torch.zeros(D)
    resumed = make_server_optimizer(name, **options)
    resumed.load_state_dict(through_bytes(make_server_optimizer(name, **options).state_dict()))
    for a, b in zip(trajectory(make_server_optimizer(name, **options), start, grads),
                    trajectory(resumed, start, grads), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_step_does_not_modify_its_inputs(name, options):
    """A round commits all or nothing: the server step must leave the old parameters and the update intact."""
    optimizer = make_server_optimizer(name, **options)
    params, grads = torch.randn(D), pseudo_gradients(3, 3)
    for g in grads:
        params_before, g_before = params.clone(), g.clone()
        new = optimizer.step(params, g)
        assert torch.equal(params, params_before) and torch.equal(g, g_before)
        assert new.shape == params.shape and new.dtype == params.dtype
        params = new


@pytest.mark.parametrize(("name", "options"), CASES)
def test_a_zero_pseudo_gradient_from_a_fresh_state_keeps_the_parameters(name, options):
    params = torch.randn(D)
    assert torch.equal(make_server_optimizer(name, **options).step(params, torch.zeros(D)), params)


def test_sgd_without_momentum_keeps_the_parameters_under_a_zero_pseudo_gradient_whatever_came_before():
    optimizer = make_server_optimizer("sgd", lr=0.7)
    params = trajectory(optimizer, torch.randn(D), pseudo_gradients(4, 5))[-1]
    for _ in range(3):
        assert torch.equal(optimizer.step(params, torch.zeros(D)), params)


def test_sgd_with_lr_one_applies_the_aggregated_update_exactly():
    """The pseudo-gradient is old − new = −u, so SGD with lr 1 is FedAvg: θ + u, bit for bit."""
    params, update = torch.randn(D), torch.randn(D)
    assert torch.equal(make_server_optimizer("sgd").step(params, -update), params + update)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_a_pseudo_gradient_of_another_shape_is_refused(name, options):
    with pytest.raises(ValueError, match=r"pseudo-gradient shape \(3,\) does not match parameter shape \(4,\)"):
        make_server_optimizer(name, **options).step(torch.zeros(4), torch.zeros(3))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_and_misspelt_options_are_refused_in_one_line(name):
    with pytest.raises(ValueError, match=rf"^server optimizer '{name}' has no option 'no_such_option'; it takes: "):
        make_server_optimizer(name, no_such_option=1)
    for option in SERVER_OPTIMIZERS.option_names(name):
        typo = option + option[-1]  # a doubled last letter
        with pytest.raises(ValueError, match=rf"has no option '{typo}' \(did you mean '{option}'\?\)"):
            make_server_optimizer(name, **{typo: 0.5})


@pytest.mark.parametrize("name", NAMES)
def test_values_out_of_range_or_not_finite_are_refused_naming_the_option(name):
    for option, field in SERVER_OPTIMIZERS.options(name).model_fields.items():
        bad = [float("nan"), "fast"]
        for constraint in field.metadata:
            for attribute, outside in (("ge", -1e-3), ("gt", 0.0), ("le", 1e-3), ("lt", 0.0)):
                bound = getattr(constraint, attribute, None)
                if bound is not None:
                    bad.append(bound + outside)
        for value in bad:
            with pytest.raises(ValueError, match=rf"^server optimizer '{name}' option '{option}': ") as error:
                make_server_optimizer(name, **{option: value})
            assert "\n" not in str(error.value)
