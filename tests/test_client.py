"""Local training against torch.optim.SGD, and the client algorithms' state updates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedgma.client import LocalSGD, PlainClient, ScaffoldClient, batch_schedule, train_client
from fedgma.data.arrays import ArrayDataset
from fedgma.models import FlatModel, build_model


def tiny_problem(n: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    data = ArrayDataset(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g))
    model = FlatModel(build_model("mlp", (1, 4, 4), 3, torch.Generator().manual_seed(seed)))
    return model, data


def reference_training(model: FlatModel, start: torch.Tensor, data: ArrayDataset, settings: LocalSGD, seed: int,
                       correction: torch.Tensor | None = None) -> torch.Tensor:
    """The same local steps with torch.optim.SGD and an explicit proximal term."""
    module = build_model("mlp", (1, 4, 4), 3, torch.Generator().manual_seed(0))
    torch.nn.utils.vector_to_parameters(start.clone(), module.parameters())
    opt = torch.optim.SGD(module.parameters(), lr=settings.lr, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    for batch in batch_schedule(len(data), settings, torch.Generator().manual_seed(seed)):
        opt.zero_grad()
        loss = F.cross_entropy(module(data.x[batch]), data.y[batch])
        if settings.prox_mu:
            w = torch.nn.utils.parameters_to_vector(module.parameters())
            loss = loss + settings.prox_mu / 2 * (w - start).pow(2).sum()
        loss.backward()
        if correction is not None:
            offset = 0
            for p in module.parameters():
                p.grad.add_(correction[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        opt.step()
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach() - start


@pytest.mark.parametrize(
    "settings",
    [
        LocalSGD(epochs=2, batch_size=8, lr=0.1),
        LocalSGD(epochs=1, batch_size=7, lr=0.05, momentum=0.9, weight_decay=1e-3),
        LocalSGD(steps=11, batch_size=16, lr=0.1, prox_mu=0.5),
    ],
)
def test_local_sgd_matches_torch_optim(settings):
    model, data = tiny_problem()
    start = model.params.clone()
    result = train_client(model, start, data, settings, torch.Generator().manual_seed(3))
    expected = reference_training(model, start, data, settings, seed=3)
    torch.testing.assert_close(result.update, expected, rtol=1e-5, atol=1e-6)
    assert result.num_samples == len(data)


def test_correction_is_added_to_every_gradient():
    model, data = tiny_problem()
    start = model.params.clone()
    correction = torch.linspace(-0.1, 0.1, model.numel)
    settings = LocalSGD(epochs=1, batch_size=10, lr=0.1)
    result = train_client(model, start, data, settings, torch.Generator().manual_seed(3), correction=correction)
    expected = reference_training(model, start, data, settings, seed=3, correction=correction)
    torch.testing.assert_close(result.update, expected, rtol=1e-5, atol=1e-6)


def test_training_never_writes_into_the_global_vector():
    model, data = tiny_problem()
    start = model.params.clone()
    global_params = start.clone()
    updates = [
        train_client(model, global_params, data.subset(range(i * 10, i * 10 + 10)), LocalSGD(lr=0.1),
                     torch.Generator().manual_seed(i)).update
        for i in range(3)
    ]
    assert torch.equal(global_params, start)
    assert all(u.abs().sum() > 0 for u in updates)
    assert not torch.equal(updates[0], updates[1])


def test_batch_schedule_covers_each_sample_once_per_epoch():
    batches = list(batch_schedule(10, LocalSGD(epochs=3, batch_size=4), torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [4, 4, 2] * 3
    for epoch in range(3):
        assert sorted(torch.cat(batches[3 * epoch : 3 * epoch + 3]).tolist()) == list(range(10))
    steps = batch_schedule(10, LocalSGD(steps=5, batch_size=4), torch.Generator().manual_seed(0))
    assert len(steps) == 5


def test_scaffold_option_two_control_variates():
    model, data = tiny_problem()
    settings = LocalSGD(epochs=1, batch_size=10, lr=0.1)
    algorithm = ScaffoldClient(settings, model.numel, num_clients=4)
    params = model.params.clone()
    algorithm.begin_round(params)
    # round 1: c = c_i = 0, so the correction is zero and training equals plain SGD
    assert torch.equal(algorithm.correction(2), torch.zeros(model.numel))
    result = train_client(model, params, data, settings, torch.Generator().manual_seed(0), algorithm.correction(2), 2)
    algorithm.finish_client(result)
    expected_ci = -result.update / (result.num_steps * settings.lr)
    assert torch.equal(algorithm.store.get(2), torch.zeros(model.numel))  # staged, not yet committed
    algorithm.end_round([result])
    torch.testing.assert_close(algorithm.store.get(2), expected_ci)
    torch.testing.assert_close(algorithm.server_control, expected_ci / 4)
    # round 2: client 2's correction is c − c_2
    algorithm.begin_round(params)
    torch.testing.assert_close(algorithm.correction(2), expected_ci / 4 - expected_ci)
    state = algorithm.state_dict()
    restored = ScaffoldClient(settings, model.numel, num_clients=4)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.correction(2), algorithm.correction(2))


def test_scaffold_rejects_momentum():
    with pytest.raises(ValueError, match="scaffold"):
        ScaffoldClient(LocalSGD(momentum=0.9), 10, 2)


def test_plain_client_names_fedprox():
    assert PlainClient(LocalSGD(prox_mu=0.1)).name == "fedprox"
    assert PlainClient(LocalSGD()).name == "sgd"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"lr": 0}, "client.lr"), ({"batch_size": 0}, "client.batch_size"), ({"momentum": 1.0}, "client.momentum"),
     ({"prox_mu": -1}, "client.prox_mu")],
)
def test_bad_local_settings_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        LocalSGD(**kwargs)


@pytest.mark.parametrize("num_samples", [1, 7, 8, 9, 33])
@pytest.mark.parametrize("settings", [LocalSGD(epochs=1, batch_size=8), LocalSGD(epochs=3, batch_size=4),
                                      LocalSGD(steps=5, batch_size=8)])
def test_num_steps_counts_the_batches_of_batch_schedule(num_samples, settings):
    """The multiprocess backend schedules clients by this count, so it must be the schedule's length."""
    assert settings.num_steps(num_samples) == len(batch_schedule(num_samples, settings, torch.Generator()))


def test_scaffold_aborted_round_leaves_every_control_variate_bit_identical():
    model, data = tiny_problem()
    settings = LocalSGD(epochs=1, batch_size=10, lr=0.1)
    algorithm = ScaffoldClient(settings, model.numel, num_clients=4)
    params = model.params.clone()
    for round_index, commit in ((1, True), (2, False)):
        algorithm.begin_round(params)
        before = {k: v.clone() for k, v in algorithm.state_dict()["store"]["values"].items()}
        control = algorithm.server_control.clone()
        for client in (0, 2):
            generator = torch.Generator().manual_seed(round_index * 10 + client)
            result = train_client(model, params, data, settings, generator, algorithm.correction(client), client)
            algorithm.finish_client(result)
        if commit:
            algorithm.end_round([])
            continue
        algorithm.abort_round()
        after = algorithm.state_dict()["store"]["values"]
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert torch.equal(algorithm.server_control, control)


def _eager_schedule(num_samples: int, settings: LocalSGD, generator: torch.Generator) -> list[torch.Tensor]:
    """The schedule as the eager implementation built it (every batch up front), for comparison."""
    batches: list[torch.Tensor] = []
    epoch = 0
    while True:
        for batch in torch.randperm(num_samples, generator=generator).split(settings.batch_size):
            batches.append(batch)
            if settings.steps is not None and len(batches) == settings.steps:
                return batches
        epoch += 1
        if settings.steps is None and epoch == settings.epochs:
            return batches


@pytest.mark.parametrize("num_samples", [1, 7, 33])
@pytest.mark.parametrize("settings", [LocalSGD(epochs=1, batch_size=8), LocalSGD(epochs=3, batch_size=4),
                                      LocalSGD(steps=5, batch_size=8), LocalSGD(steps=13, batch_size=3)])
def test_lazy_batch_schedule_gives_the_eager_batches_bit_for_bit_on_every_pass(num_samples, settings):
    schedule = batch_schedule(num_samples, settings, torch.Generator().manual_seed(3))
    eager = _eager_schedule(num_samples, settings, torch.Generator().manual_seed(3))
    for _ in range(2):  # a second pass replays the same batches (the vectorized backend iterates twice)
        lazy = list(schedule)
        assert len(lazy) == len(eager) == len(schedule)
        assert all(torch.equal(a, b) for a, b in zip(lazy, eager, strict=True))


def test_batch_schedule_of_a_hundred_million_epochs_is_made_without_building_it():
    """Memory must not depend on the number of epochs: only the first batches are ever materialised."""
    schedule = batch_schedule(10, LocalSGD(epochs=100_000_000, batch_size=4), torch.Generator().manual_seed(0))
    assert len(schedule) == 300_000_000
    first = [batch for _, batch in zip(range(3), schedule, strict=False)]
    assert sorted(torch.cat(first).tolist()) == list(range(10))


def test_batch_schedule_refuses_an_empty_client():
    with pytest.raises(ValueError, match="no samples"):
        batch_schedule(0, LocalSGD(), torch.Generator())
