"""Feature-skew transforms, per-client domains and Colored MNIST environments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedgma.data import domains as D
from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.partition import iid


def images(n: int = 8, c: int = 1, size: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))


def digit_like(n: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Grey 'images' with a normalised-MNIST-like range (background negative) and 10 classes."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 8, 8, generator=g) > 0.7).float() * 2.8 - 0.42
    y = np.random.default_rng(seed).integers(0, 10, n)
    return x, y


# ---------------------------------------------------------------- rotation


@pytest.mark.parametrize("k", [-1, 0, 1, 2, 3, 5])
def test_rotate_multiples_of_90_equal_rot90(k):
    x = images()
    assert torch.equal(D.rotate(x, 90.0 * k), torch.rot90(x, k, dims=(2, 3)))


def test_rotate_interpolated_path_agrees_with_rot90_near_90():
    x = images(size=16)
    nearly = D.rotate(x, 89.999)  # grid_sample path
    assert torch.allclose(nearly, torch.rot90(x, 1, dims=(2, 3)), atol=1e-3)


def test_rotate_fills_corners_with_background():
    x = torch.full((1, 1, 10, 10), 5.0)
    out = D.rotate(x, 45.0, fill=-1.0)
    assert out[0, 0, 0, 0] == pytest.approx(-1.0)
    assert out[0, 0, 5, 5] == pytest.approx(5.0)
    assert D.rotate(x - 6.0, 45.0)[0, 0, 0, 0] == pytest.approx(-1.0)  # default fill: the batch minimum


def test_rotate_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        D.rotate(torch.zeros(3, 4), 90)
    with pytest.raises(ValueError, match="degrees"):
        D.rotate(images(), float("nan"))


# ---------------------------------------------------------------- noise and colour


def test_add_noise_is_deterministic_and_scaled():
    x = torch.zeros(2000, 1, 4, 4)
    a, b, c = D.add_noise(x, 0.5, 3), D.add_noise(x, 0.5, 3), D.add_noise(x, 0.5, 4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.std()) == pytest.approx(0.5, rel=0.02)
    assert torch.equal(D.add_noise(x, 0.5, torch.Generator().manual_seed(3)), a)
    assert torch.equal(D.add_noise(x, 0.0, 3), x)
    with pytest.raises(ValueError, match="sigma"):
        D.add_noise(x, -1.0, 0)
    with pytest.raises(ValueError, match="seed"):
        D.add_noise(x, 1.0, None)


def test_noise_domains_follow_niid_bench():
    levels = [d.noise for d in D.noise_domains(4, 0.2)]
    assert levels == pytest.approx([0.0, 0.05, 0.1, 0.15])


def test_color_contrast_shift():
    x = images(c=1)
    assert torch.allclose(D.color_contrast_shift(x), x)
    flat = D.color_contrast_shift(x, contrast=0.0)
    assert torch.allclose(flat, x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))
    assert torch.allclose(D.color_contrast_shift(x, brightness=0.5), x + 0.5)
    tinted = D.color_contrast_shift(x, tint=(1.0, 0.5, 0.0), background=0.0)
    assert tinted.shape == (8, 3, 12, 12)
    assert torch.allclose(tinted[:, 0], x[:, 0]) and torch.allclose(tinted[:, 1], 0.5 * x[:, 0])
    assert torch.allclose(tinted[:, 2], torch.zeros_like(x[:, 0]))
    with pytest.raises(ValueError, match="tint"):
        D.color_contrast_shift(x, tint=(1.0, 2.0))
    with pytest.raises(ValueError, match="contrast"):
        D.color_contrast_shift(x, contrast=-1.0)


# ---------------------------------------------------------------- domains per client


def test_assign_domains_modes():
    assert D.assign_domains(6, 3, "contiguous").tolist() == [0, 0, 1, 1, 2, 2]
    assert D.assign_domains(6, 3, "round_robin").tolist() == [0, 1, 2, 0, 1, 2]
    random = D.assign_domains(6, 3, "random", seed=1)
    assert sorted(random.tolist()) == [0, 0, 1, 1, 2, 2]
    assert np.array_equal(random, D.assign_domains(6, 3, "random", seed=1))
    with pytest.raises(ValueError, match="mode"):
        D.assign_domains(6, 3, "other")
    with pytest.raises(ValueError, match="num_domains"):
        D.assign_domains(2, 3)


def test_feature_skew_gives_each_client_its_domain():
    x, y = digit_like(60)
    data = ArrayDataset(x, torch.as_tensor(y))
    parts = iid(60, 4, seed=0)
    doms = D.rotation_domains([0, 90]) + [D.Domain("noisy", noise=0.3), D.Domain("red", tint=(1.0, 0.0, 0.0))]
    out, domain_of = D.feature_skew(data, parts, doms, assignment="round_robin", seed=5)
    assert domain_of.tolist() == [0, 1, 2, 3]
    assert out.x.shape == (60, 3, 8, 8)  # the tinted domain makes every client 3-channel
    assert torch.equal(out.y, data.y)
    p0, p1, p2, p3 = (torch.as_tensor(p) for p in parts)
    assert torch.equal(out.x[p0], x[p0].expand(-1, 3, -1, -1))
    assert torch.equal(out.x[p1], torch.rot90(x[p1], 1, dims=(2, 3)).expand(-1, 3, -1, -1))
    assert not torch.equal(out.x[p2], x[p2].expand(-1, 3, -1, -1))
    lo = float(x.min())
    assert torch.allclose(out.x[p3][:, 1], torch.full_like(x[p3][:, 0], lo))
    again, _ = D.feature_skew(data, parts, doms, assignment="round_robin", seed=5)
    assert torch.equal(again.x, out.x)
    with pytest.raises(ValueError, match="assignment"):
        D.feature_skew(data, parts, doms, assignment=[0, 1, 2])


def test_held_out_domains_rotate_the_test_set():
    x, y = digit_like(20)
    test = ArrayDataset(x, torch.as_tensor(y))
    held = D.held_out_domains(test, D.rotation_domains([60, 90]))
    assert list(held) == ["rot60", "rot90"]
    assert torch.equal(held["rot90"].x, torch.rot90(x, 1, dims=(2, 3)))
    assert not torch.allclose(held["rot60"].x, x)
    with pytest.raises(ValueError, match="distinct names"):
        D.held_out_domains(test, [D.Domain("a"), D.Domain("a")])


# ---------------------------------------------------------------- Colored MNIST


def colour_of(env: ArrayDataset) -> np.ndarray:
    return (env.x[:, 1].sum(dim=(1, 2)) > env.x[:, 0].sum(dim=(1, 2))).long().numpy()


def test_colored_environments_agreement_rates():
    x, y = digit_like(12000, seed=1)
    x[:, :, 0, 0] = 2.38  # no blank images, so every image has a visible colour
    probabilities = [0.9, 0.8, 0.5, 0.2, 0.1]
    envs = D.colored_environments(x, y, probabilities, label_noise=0.25, seed=0)
    assert len(envs) == 5 and sum(len(e) for e in envs) == 12000
    for env, p in zip(envs, probabilities, strict=True):
        assert set(env.y.unique().tolist()) <= {0, 1}
        assert env.x.shape[1:] == (2, 8, 8)
        assert float(env.x.min()) == 0.0 and float(env.x.max()) == 1.0
        assert (env.x.amin(dim=(2, 3)).amax(dim=1) == 0).all()  # one channel black
        agreement = np.mean(colour_of(env) == env.y.numpy())
        assert abs(agreement - p) < 0.035, (p, agreement)


def test_colored_environments_label_noise():
    x, y = digit_like(8000, seed=2)
    (env,) = D.colored_environments(x, y, [0.5], label_noise=0.25, seed=3, parts=[np.arange(8000)])
    clean = (y >= 5).astype(np.int64)
    assert abs(np.mean(env.y.numpy() != clean) - 0.25) < 0.02
    (noiseless,) = D.colored_environments(x, y, [1.0], label_noise=0.0, seed=3, parts=[np.arange(8000)])
    assert np.array_equal(noiseless.y.numpy(), clean)


def test_colored_environments_deterministic_and_downsampled():
    x, y = digit_like(100)
    a = D.colored_environments(x[:, 0], y, [0.9, 0.1], seed=4, downsample=2)
    b = D.colored_environments(x[:, 0], y, [0.9, 0.1], seed=4, downsample=2)
    c = D.colored_environments(x[:, 0], y, [0.9, 0.1], seed=5, downsample=2)
    assert a[0].x.shape[2:] == (4, 4)
    assert all(torch.equal(u.x, v.x) and torch.equal(u.y, v.y) for u, v in zip(a, b, strict=True))
    assert not all(torch.equal(u.y, v.y) for u, v in zip(a, c, strict=True))


def test_colored_environments_bad_arguments():
    x, y = digit_like(10)
    with pytest.raises(ValueError, match="env_probabilities"):
        D.colored_environments(x, y, [1.5])
    with pytest.raises(ValueError, match="label_noise"):
        D.colored_environments(x, y, [0.9], label_noise=2.0)
    with pytest.raises(ValueError, match="labels"):
        D.colored_environments(x, y[:5], [0.9])
    with pytest.raises(ValueError, match="parts"):
        D.colored_environments(x, y, [0.9, 0.8], parts=[np.arange(10)])


def test_colored_splits_reverses_the_test_environment():
    x, y = digit_like(4000, seed=3)
    x[:, :, 0, 0] = 2.38
    xt, yt = digit_like(2000, seed=4)
    xt[:, :, 0, 0] = 2.38
    base = DatasetSplits("mnist", ArrayDataset(x, torch.as_tensor(y)), ArrayDataset(xt, torch.as_tensor(yt)), 10)
    colored = D.colored_splits(base, seed=0, clients_per_environment=3)
    assert colored.name == "colored-mnist" and colored.num_classes == 2
    assert sorted(np.unique(colored.train_client_ids).tolist()) == list(range(6))
    assert colored.metadata["environment_of_client"] == [0, 0, 0, 1, 1, 1]
    train_agreement = np.mean(colour_of(colored.train) == colored.train.y.numpy())
    test_agreement = np.mean(colour_of(colored.test) == colored.test.y.numpy())
    assert abs(train_agreement - 0.85) < 0.03
    assert abs(test_agreement - 0.1) < 0.03


def test_feature_skew_accepts_a_seed_sequence():
    x, y = digit_like(40)
    data = ArrayDataset(x, torch.as_tensor(y))
    parts = iid(40, 4, seed=0)
    doms = D.noise_domains(4, 0.4)
    a, where_a = D.feature_skew(data, parts, doms, "random", np.random.SeedSequence(3))
    b, where_b = D.feature_skew(data, parts, doms, "random", np.random.SeedSequence(3))
    assert torch.equal(a.x, b.x) and np.array_equal(where_a, where_b)
