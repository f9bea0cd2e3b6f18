"""Feature skew: per-client input domains and spurious-correlation environments.

Label-skew partitions (:mod:`fedgma.data.partition`) change *which* records a client holds; the
functions here change *what the inputs look like* per client, the "feature distribution skew" of
NIID-Bench (Li et al. 2022) and of Kairouz et al. 2021 §3.1 ("Advances and Open Problems in
Federated Learning"): rotated, noisy, recoloured images per client, and held-out test domains
no client saw. :func:`colored_environments` builds IRM's Colored MNIST (Arjovsky, Bottou, Gulrajani
and Lopez-Paz 2019, "Invariant Risk Minimization"), the out-of-distribution test of the GMA paper
(Tenison, Sreeramadas, Mugunthan, Oyallon, Rish and Belilovsky 2023, "Gradient Masked Averaging for
Federated Learning"): a colour that predicts the label well on training clients and badly at test.

All functions are pure: they return new tensors and take their randomness from an explicit seed
or :class:`torch.Generator`, so the same call gives the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedgma.data.arrays import ArrayDataset, DatasetSplits

__all__ = [
    "FASHION_MNIST_BINARY_GROUPS",
    "Domain",
    "add_noise",
    "assign_domains",
    "color_contrast_shift",
    "colored_environments",
    "colored_splits",
    "feature_skew",
    "held_out_domains",
    "noise_domains",
    "rotate",
    "rotation_domains",
]

#: The binary task used for Colored Fashion-MNIST: label 0 for classes 0-4 (T-shirt/top, Trouser,
#: Pullover, Dress, Coat), label 1 for classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot). It
#: mirrors IRM's "digit < 5" split of MNIST, keeps the two groups balanced and, with Shirt versus
#: T-shirt/Pullover/Coat across the boundary, leaves the shape signal imperfect as in MNIST.
FASHION_MNIST_BINARY_GROUPS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


def _check_images(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be an image batch [N, C, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")


def _generator(seed: int | np.random.SeedSequence | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed or torch.Generator is required: noise is never drawn from global random state")
    if isinstance(seed, np.random.SeedSequence):
        seed = int(seed.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, a SeedSequence or a torch.Generator, got {seed!r}")
    return torch.Generator().manual_seed(int(seed))


def _background(x: Tensor, background: float | None) -> float:
    return float(x.min()) if background is None else float(background)


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def rotate(x: Tensor, degrees: float, fill: float | None = None) -> Tensor:
    """Rotate an image batch [N, C, H, W] counter-clockwise by ``degrees`` (Rotated MNIST domains).

    Multiples of 90° are exact (:func:`torch.rot90`; a quarter turn swaps H and W). Other angles use
    bilinear :func:`torch.nn.functional.grid_sample` about the image centre; pixels coming from
    outside the image take ``fill``, by default the batch minimum (the background of normalised
    MNIST-like images). Rotated MNIST as a multi-domain benchmark: Ghifary et al. 2015.
    """
    _check_images(x)
    if not math.isfinite(degrees):
        raise ValueError(f"degrees must be finite, got {degrees!r}")
    quarter = degrees / 90.0
    if quarter == round(quarter):
        return torch.rot90(x, int(round(quarter)) % 4, dims=(2, 3)).contiguous()
    fill = _background(x, fill)
    t = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    rotated = F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rotated + fill


def add_noise(x: Tensor, sigma: float, generator: int | np.random.SeedSequence | torch.Generator) -> Tensor:
    """Add Gaussian noise N(0, σ²) to every input (NIID-Bench noise-based feature skew).

    ``generator`` is a :class:`torch.Generator` or a seed for one; the same seed gives the same noise.
    NIID-Bench gives client i of N the level σ·i/N (see :func:`noise_domains`).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point torch.Tensor")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number ≥ 0, got {sigma!r}")
    gen = _generator(generator)
    if sigma == 0:
        return x.clone()
    noise = torch.randn(x.shape, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
    return x + sigma * noise


def color_contrast_shift(
    x: Tensor,
    contrast: float = 1.0,
    brightness: float = 0.0,
    tint: Sequence[float] | None = None,
    background: float | None = None,
) -> Tensor:
    """Change contrast and brightness of an image batch [N, C, H, W], optionally tinting it.

    Contrast scales each image about its own mean (as torchvision's ``adjust_contrast``), then
    ``brightness`` is added. ``tint`` = (r, g, b) turns a 1-channel batch into a 3-channel one
    whose channel c is ``background + tint[c] · (x − background)``: the background (by default the
    batch minimum) stays put and the strokes take the colour. A 3-channel batch is scaled the same
    way per channel. Colour/contrast domains in the spirit of the feature-skew settings of
    Li et al. 2021 (FedBN) and NIID-Bench.
    """
    _check_images(x)
    for name, value in (("contrast", contrast), ("brightness", brightness)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
    if contrast < 0:
        raise ValueError(f"contrast must be ≥ 0, got {contrast!r}")
    out = x
    if tint is not None:
        tint_t = torch.as_tensor(tuple(tint), dtype=x.dtype, device=x.device)
        if tint_t.shape != (3,) or not torch.isfinite(tint_t).all():
            raise ValueError(f"tint must be three finite numbers (r, g, b), got {tint!r}")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"tint needs 1- or 3-channel images, got {x.shape[1]} channels")
        lo = _background(x, background)
        out = lo + (x - lo).expand(-1, 3, -1, -1) * tint_t.view(1, 3, 1, 1)
    if contrast != 1.0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + contrast * (out - mean)
    if brightness != 0.0:
        out = out + brightness
    return out if out is not x else x.clone()


@dataclass(frozen=True)
class Domain:
    """One input domain: a colour/contrast change, then a rotation, then Gaussian noise.

    The identity by default; ``name`` labels it in metrics (``held_out_domains`` keys).
    """

    name: str = "identity"
    rotation: float = 0.0
    noise: float = 0.0
    contrast: float = 1.0
    brightness: float = 0.0
    tint: tuple[float, float, float] | None = None

    def apply(self, x: Tensor, seed: int | np.random.SeedSequence | torch.Generator = 0, background=None) -> Tensor:
        lo = _background(x, background)
        out = x
        if self.tint is not None or self.contrast != 1.0 or self.brightness != 0.0:
            out = color_contrast_shift(out, self.contrast, self.brightness, self.tint, background=lo)
        if self.rotation:
            out = rotate(out, self.rotation, fill=lo + self.brightness)
        if self.noise:
            out = add_noise(out, self.noise, seed)
        return out if out is not x else x.clone()

    def output_channels(self, channels: int) -> int:
        return 3 if self.tint is not None else channels


def rotation_domains(angles: Sequence[float]) -> list[Domain]:
    """One :class:`Domain` per angle, named ``rot{angle}`` (Rotated MNIST: 0°, 15°, …, 75°)."""
    return [Domain(name=f"rot{a:g}", rotation=float(a)) for a in angles]


def noise_domains(num_clients: int, sigma: float) -> list[Domain]:
    """NIID-Bench noise-based feature skew: client i of N gets noise level σ·i/N, i = 0 … N−1.

    This is the paper's formula (Li et al. 2022, §III-B, x̂ ~ x + Gau(σ·i/N)); their code divides by
    N − 1 instead, so its last client reaches σ.
    """
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number ≥ 0, got {sigma!r}")
    return [
        Domain(name=f"noise{sigma * i / num_clients:.4g}", noise=sigma * i / num_clients) for i in range(num_clients)
    ]


# --------------------------------------------------------------------------------------------
# Domains per client
# --------------------------------------------------------------------------------------------


def assign_domains(num_clients: int, num_domains: int, mode: str = "contiguous", seed: int = 0) -> np.ndarray:
    """Domain index of every client.

    ``contiguous``: clients split into ``num_domains`` consecutive near-equal groups (group g gets
    domain g); ``round_robin``: client i gets domain i mod D; ``random``: a seeded random balanced
    assignment. With ``num_clients == num_domains`` every mode but ``random`` gives client i domain i.
    """
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if isinstance(num_domains, bool) or int(num_domains) != num_domains or not 1 <= num_domains <= num_clients:
        raise ValueError(f"num_domains must be an integer in [1, num_clients={num_clients}], got {num_domains!r}")
    if mode == "contiguous":
        return np.repeat(np.arange(num_domains), [len(p) for p in np.array_split(np.arange(num_clients), num_domains)])
    if mode == "round_robin":
        return np.arange(num_clients) % num_domains
    if mode == "random":
        return np.random.default_rng(seed).permutation(np.arange(num_clients) % num_domains)
    raise ValueError(f"mode must be 'contiguous', 'round_robin' or 'random', got {mode!r}")


def feature_skew(
    dataset: ArrayDataset,
    parts: Sequence[np.ndarray],
    domains: Sequence[Domain],
    assignment: str | Sequence[int] | np.ndarray = "contiguous",
    seed: int | np.random.SeedSequence = 0,
) -> tuple[ArrayDataset, np.ndarray]:
    """Give each client's records its domain: returns the transformed dataset and each client's domain index.

    ``parts`` are the clients' index arrays (from :mod:`fedgma.data.partition`); ``assignment`` is a
    mode for :func:`assign_domains` or an explicit domain index per client. Records in no part are
    left unchanged. Noise for client i is drawn from its own child of ``SeedSequence(seed)``, so a
    client's inputs do not depend on the other clients. When some domains tint (1 → 3 channels),
    the others' grey images are repeated over 3 channels so all inputs share one shape.
    """
    _check_images(dataset.x, "dataset.x")
    if len(domains) == 0:
        raise ValueError("domains is empty: give at least one Domain")
    if isinstance(assignment, str):
        mode_seed = int(seed.generate_state(1)[0]) if isinstance(seed, np.random.SeedSequence) else seed
        domain_of = assign_domains(len(parts), len(domains), assignment, mode_seed)
    else:
        domain_of = np.asarray(assignment, dtype=np.int64)
        if domain_of.shape != (len(parts),) or domain_of.min() < 0 or domain_of.max() >= len(domains):
            raise ValueError(
                f"assignment must give each of the {len(parts)} clients a domain index in [0, {len(domains) - 1}]"
            )
    channels = dataset.x.shape[1]
    out_channels = max(d.output_channels(channels) for d in domains)
    if out_channels != channels and channels != 1:
        raise ValueError(f"tinted domains need 1-channel inputs when mixed with others, got {channels} channels")
    x = dataset.x.expand(-1, out_channels, -1, -1).clone()
    background = float(dataset.x.min())
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    for client, (part, child) in enumerate(zip(parts, sequence.spawn(len(parts)), strict=True)):
        index = torch.as_tensor(np.asarray(part, dtype=np.int64))
        if index.numel() == 0:
            continue
        transformed = domains[domain_of[client]].apply(dataset.x[index], child, background=background)
        if transformed.shape[2:] != x.shape[2:]:
            raise ValueError(f"domain {domains[domain_of[client]].name!r} changes the image size; use square images")
        x[index] = transformed.expand(-1, out_channels, -1, -1)
    return ArrayDataset(x, dataset.y.clone()), domain_of


def held_out_domains(
    test: ArrayDataset, domains: Sequence[Domain], seed: int | np.random.SeedSequence = 0
) -> dict[str, ArrayDataset]:
    """The whole test set under each held-out domain, keyed by the domain's name.

    E.g. ``held_out_domains(splits.test, rotation_domains([60, 90]))`` gives ``{"rot60": …, "rot90": …}``
    for out-of-domain evaluation (domain generalisation; Ghifary et al. 2015's Rotated MNIST).
    """
    _check_images(test.x, "test.x")
    names = [d.name for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"held-out domains need distinct names, got {names}")
    sequence = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    background = float(test.x.min()) if len(test) else 0.0
    return {
        d.name: ArrayDataset(d.apply(test.x, child, background=background), test.y.clone())
        for d, child in zip(domains, sequence.spawn(len(domains)), strict=True)
    }


# --------------------------------------------------------------------------------------------
# Spurious-correlation environments (Colored MNIST)
# --------------------------------------------------------------------------------------------


def colored_environments(
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray,
    env_probabilities: Sequence[float],
    label_noise: float = 0.25,
    seed: int | np.random.SeedSequence = 0,
    *,
    positive_classes: Sequence[int] = (5, 6, 7, 8, 9),
    parts: Sequence[np.ndarray] | None = None,
    downsample: int = 1,
) -> list[ArrayDataset]:
    """IRM's Colored MNIST environments (Arjovsky et al. 2019), one :class:`ArrayDataset` per environment.

    The binary label is 1 for ``positive_classes`` and 0 otherwise (MNIST digits ≥ 5; for
    Fashion-MNIST see :data:`FASHION_MNIST_BINARY_GROUPS`), then flipped with probability
    ``label_noise`` (0.25 in IRM, so shape predicts the label 75% of the time). Each image is put in
    the red (0) or green (1) channel of a 2-channel image, the other channel zero; the colour equals
    the noisy label with the environment's probability p. IRM trains on p = 0.9 and 0.8 and tests on
    p = 0.1, where the colour is reversed. p = 0.5 makes colour uninformative and p < 0.5 reverses it,
    so spurious signals can differ in strength or direction across clients.

    ``images`` [N, H, W] or [N, 1, H, W] in any range are mapped to [0, 1] by one affine map (the
    batch's min and max) so the uncoloured channel is true black; ``downsample`` = 2 gives IRM's
    14×14. Environment e holds the records ``parts[e]``, by default a seeded near-equal random split.
    Labels of the returned datasets lie in {0, 1} (num_classes = 2).
    """
    x = torch.as_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(x, Tensor):
        raise ValueError(f"images must be a tensor or array, got {type(images).__name__}")
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be grey [N, H, W] or [N, 1, H, W], got shape {tuple(x.shape)}")
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels)
    if y.shape != (x.shape[0],) or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be {x.shape[0]} integers, got shape {y.shape}, dtype {y.dtype}")
    probabilities = [float(p) for p in env_probabilities]
    if not probabilities or not all(0.0 <= p <= 1.0 for p in probabilities):
        raise ValueError(
            f"env_probabilities must be a non-empty list of probabilities in [0, 1], got {env_probabilities!r}"
        )
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise!r}")
    if isinstance(downsample, bool) or int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be a positive integer, got {downsample!r}")
    rng = np.random.default_rng(seed)
    if parts is None:
        permutation = rng.permutation(len(y))
        parts = [np.sort(p) for p in np.array_split(permutation, len(probabilities))]
    elif len(parts) != len(probabilities):
        raise ValueError(f"parts has {len(parts)} entries but env_probabilities has {len(probabilities)}")

    x = x.float()
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
    x = (x - lo) / (hi - lo if hi > lo else 1.0)
    x = x[:, :, :: int(downsample), :: int(downsample)]
    binary = np.isin(y, np.asarray(tuple(positive_classes))).astype(np.int64)
    noisy = binary ^ (rng.random(len(y)) < label_noise)

    environments = []
    for part, p in zip(parts, probabilities, strict=True):
        index = np.asarray(part, dtype=np.int64)
        env_labels = noisy[index]
        colour = np.where(rng.random(len(index)) < p, env_labels, 1 - env_labels)
        coloured = torch.zeros(len(index), 2, *x.shape[2:], dtype=torch.float32)
        rows = torch.arange(len(index))
        coloured[rows, torch.as_tensor(colour)] = x[torch.as_tensor(index), 0]
        environments.append(ArrayDataset(coloured, torch.as_tensor(env_labels, dtype=torch.int64)))
    return environments


def colored_splits(
    splits: DatasetSplits,
    train_probabilities: Sequence[float] = (0.9, 0.8),
    test_probability: float = 0.1,
    label_noise: float = 0.25,
    seed: int = 0,
    *,
    clients_per_environment: int = 1,
    positive_classes: Sequence[int] = (5, 6, 7, 8, 9),
    downsample: int = 1,
) -> DatasetSplits:
    """A Colored MNIST-style :class:`DatasetSplits` from a grey image dataset (MNIST, Fashion-MNIST).

    The training set is split into one environment per entry of ``train_probabilities``, each cut
    IID into ``clients_per_environment`` clients whose ids (``env * clients_per_environment + j``)
    are the ``train_client_ids``; the test set is one environment with ``test_probability``
    (reversed colour, 0.1, by default). ``metadata["environment_of_client"]`` maps client to
    environment. Defaults follow IRM (Arjovsky et al. 2019).
    """
    if isinstance(clients_per_environment, bool) or int(clients_per_environment) != clients_per_environment:
        raise ValueError(f"clients_per_environment must be a positive integer, got {clients_per_environment!r}")
    if clients_per_environment < 1:
        raise ValueError(f"clients_per_environment must be a positive integer, got {clients_per_environment!r}")
    train_seq, test_seq, client_seq = np.random.SeedSequence(seed).spawn(3)
    train_envs = colored_environments(
        splits.train.x,
        splits.train.y,
        train_probabilities,
        label_noise,
        train_seq,
        positive_classes=positive_classes,
        downsample=downsample,
    )
    # the test set is mapped to [0, 1] by its own min/max; for normalised image sets these equal the train ones
    (test_env,) = colored_environments(
        splits.test.x,
        splits.test.y,
        [test_probability],
        label_noise,
        test_seq,
        positive_classes=positive_classes,
        downsample=downsample,
    )
    client_rng = np.random.default_rng(client_seq)
    client_ids = []
    for e, env in enumerate(train_envs):
        owner = np.empty(len(env), dtype=np.int64)
        for j, part in enumerate(np.array_split(client_rng.permutation(len(env)), clients_per_environment)):
            owner[part] = e * clients_per_environment + j
        client_ids.append(owner)
    return DatasetSplits(
        name=f"colored-{splits.name}",
        train=ArrayDataset(torch.cat([e.x for e in train_envs]), torch.cat([e.y for e in train_envs])),
        test=test_env,
        num_classes=2,
        train_client_ids=np.concatenate(client_ids),
        test_client_ids=None,
        metadata={
            "train_probabilities": [float(p) for p in train_probabilities],
            "test_probability": float(test_probability),
            "label_noise": float(label_noise),
            "positive_classes": [int(c) for c in positive_classes],
            "environment_of_client": np.repeat(np.arange(len(train_envs)), clients_per_environment).tolist(),
        },
    )
