"""The federated view of a dataset: one tensor dataset per client, plus the test sets.

``build_federated`` turns a ``[data]`` config section and the run's seed into a
:class:`FederatedDataset`. Step by step:

1. load ``data.dataset`` with the loader options ``[data.options]`` (Synthetic(α, β), a user
   file's ``path`` and columns, Colored MNIST's environments, …); optionally keep a fixed random
   subset of the records (``data.train_subset`` / ``data.test_subset``);
2. split the training records among ``data.num_clients + data.holdout_clients`` clients with the
   partitioner ``data.partition`` (iid, dirichlet, shards, quantity, quantity-label, natural; see
   :mod:`fedgma.data.partition`) and check the split covers every record exactly once;
3. feature skew (``[data.domains]``): give every client a domain, an input transform (rotation,
   Gaussian noise, contrast, brightness, tint), and transform the global test set *like the
   training domains* (each test record takes a training domain, in the proportions of the
   training records), so ``test_accuracy`` is in-distribution; each held-out test domain becomes
   a test set ``extra_tests["ood/<name>"]`` that no client saw. Colored MNIST datasets get the same
   treatment: the test set is recoloured with the training environments' mixture and the
   reversed environment becomes ``extra_tests["ood/env<p>"]``;
4. hold out ``data.holdout_clients`` whole clients, chosen at random: they never train, and the
   simulator reports accuracy on each of them (mean and worst 10%);
5. record per-client statistics (:func:`fedgma.data.partition.partition_stats`) for
   ``partition.json``, ``fedgma partition`` and the heat-maps of :mod:`fedgma.plots`.

Every random choice derives from the config seed through :mod:`fedgma.seeding`, except the record
subsets, which are fixed (like the digits train/test split) so every seed sees the same data.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedgma.data import partition
from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError, check_options, load_dataset, loader_options
from fedgma.data.domains import Domain, feature_skew, held_out_domains, noise_domains
from fedgma.seeding import numpy_rng, seed_sequence

__all__ = [
    "DOMAIN_KINDS",
    "FederatedDataset",
    "available_partitions",
    "build_federated",
    "hold_out_validation",
    "label_counts",
    "make_domains",
    "register_partition",
]


@dataclass
class FederatedDataset:
    """Client training sets, the global test set, and extra test sets.

    ``extra_tests`` maps a name to a test set evaluated besides ``test``: ``"ood/<domain>"`` for a
    held-out domain (its accuracies are also averaged into ``ood_accuracy``), ``"validation"`` for
    the records :func:`hold_out_validation` took. ``holdout_clients`` are whole clients that never
    train; the simulator reports their accuracies' mean and worst 10%.
    """

    clients: list[ArrayDataset]
    test: ArrayDataset
    num_classes: int
    extra_tests: dict[str, ArrayDataset] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    holdout_clients: list[ArrayDataset] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.test.x.shape[1:])

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def to(self, device: torch.device | str) -> FederatedDataset:
        return FederatedDataset(
            [c.to(device) for c in self.clients],
            self.test.to(device),
            self.num_classes,
            {k: v.to(device) for k, v in self.extra_tests.items()},
            self.statistics,
            [c.to(device) for c in self.holdout_clients],
        )


# --------------------------------------------------------------------------------------------
# Partitioners by name
# --------------------------------------------------------------------------------------------

#: A partitioner: (loaded splits, the [data] config, number of clients, seed) -> one index array per client.
Partitioner = Callable[[DatasetSplits, Any, int, np.random.SeedSequence], list[np.ndarray]]


def _labels(splits: DatasetSplits) -> np.ndarray:
    return splits.train.y.numpy()


def _quantity_skew(cfg: Any) -> dict[str, float | None]:
    if (cfg.beta is None) == (cfg.sigma is None):
        raise ValueError(
            f"config keys 'data.beta' / 'data.sigma': partition {cfg.partition!r} needs exactly one of data.beta "
            "(Dirichlet(β) client shares, NIID-Bench) or data.sigma (log-normal(0, σ) client sizes)"
        )
    return {"beta": cfg.beta, "sigma": cfg.sigma}


def _natural(splits: DatasetSplits, cfg: Any, n: int, ss: np.random.SeedSequence) -> list[np.ndarray]:
    if splits.train_client_ids is None:
        raise ValueError(
            f"config key 'data.partition': 'natural' needs a dataset with client ids (synthetic, femnist, "
            f"colored-*, or a user file with a client column); dataset {splits.name!r} has none"
        )
    parts, ids = partition.natural(splits.train_client_ids)
    if len(parts) != n:
        raise ValueError(
            f"config key 'data.num_clients': dataset {splits.name!r} has {len(parts)} natural clients, but "
            f"data.num_clients + data.holdout_clients = {n}; set data.num_clients = {len(parts) - cfg.holdout_clients}"
        )
    return parts


_PARTITIONS: dict[str, Partitioner] = {
    "iid": lambda splits, cfg, n, ss: partition.iid(len(splits.train), n, ss),
    "dirichlet": lambda splits, cfg, n, ss: partition.dirichlet(_labels(splits), n, cfg.alpha, ss, cfg.min_size),
    "shards": lambda splits, cfg, n, ss: partition.shards(_labels(splits), n, cfg.classes_per_client, ss),
    "quantity": lambda splits, cfg, n, ss: partition.quantity(
        len(splits.train), n, ss, min_size=cfg.min_size, **_quantity_skew(cfg)
    ),
    "quantity-label": lambda splits, cfg, n, ss: partition.quantity_label_skew(
        _labels(splits), n, cfg.alpha, ss, min_size=cfg.min_size, **_quantity_skew(cfg)
    ),
    "natural": _natural,
}


def register_partition(name: str, partitioner: Partitioner) -> None:
    """Make a partitioner available by name (``data.partition``)."""
    _PARTITIONS[name] = partitioner


def available_partitions() -> list[str]:
    return sorted(_PARTITIONS)


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """A [clients, classes] array of how many records of each class every client holds."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]) if parts else np.zeros((0, 0))


# --------------------------------------------------------------------------------------------
# Loading, with a small cache
# --------------------------------------------------------------------------------------------

_CACHE: dict[str, DatasetSplits] = {}
_CACHE_SIZE = 2
# Only the large fixed image sets are kept (user files may change between loads; the rest load fast).
# Everything built from a cached DatasetSplits makes new tensors or leaves them untouched.
_CACHED_DATASETS = {"fashion-mnist", "mnist", "cifar10", "cifar100", "colored-mnist", "colored-fashion-mnist"}


def _load(cfg: Any, total_clients: int) -> DatasetSplits:
    """``load_dataset`` with the config's options; keeps the last two image sets (tests and sweeps reload often).

    A loader that takes ``num_clients`` (Synthetic(α, β)) and is not given one in ``[data.options]``
    gets ``data.num_clients + data.holdout_clients``, so the dataset has the config's clients.
    """
    options = dict(getattr(cfg, "options", None) or {})
    if "num_clients" not in options and "num_clients" in (loader_options(cfg.dataset) or []):
        options["num_clients"] = total_clients
    try:
        check_options(cfg.dataset, options)
    except ValueError as error:
        raise DatasetError(f"config key 'data.options': {error}") from None
    key = json.dumps([cfg.dataset, cfg.data_dir, cfg.download, options], sort_keys=True, default=str)
    if key in _CACHE:
        return _CACHE[key]
    try:
        splits = load_dataset(cfg.dataset, data_dir=cfg.data_dir, download=cfg.download, **options)
    except TypeError as error:  # a loader called with an option of the wrong kind
        raise DatasetError(f"config section [data.options] for dataset {cfg.dataset!r}: {error}") from None
    if cfg.dataset in _CACHED_DATASETS:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = splits
    return splits


def _subset(splits: DatasetSplits, train_size: int | None, test_size: int | None) -> DatasetSplits:
    """A fixed random subset of the records (the same for every run seed); client ids follow their records."""
    if train_size is None and test_size is None:
        return splits
    rng = np.random.default_rng(np.random.SeedSequence(0, spawn_key=(0x5AB5E7,)))
    train_index = test_index = None
    if train_size is not None and train_size < len(splits.train):
        train_index = np.sort(rng.permutation(len(splits.train))[:train_size])
    if test_size is not None and test_size < len(splits.test):
        test_index = np.sort(rng.permutation(len(splits.test))[:test_size])

    def pick(ids: np.ndarray | None, index: np.ndarray | None) -> np.ndarray | None:
        return ids if ids is None or index is None else ids[index]

    return dataclasses.replace(
        splits,
        train=splits.train if train_index is None else splits.train.subset(train_index),
        test=splits.test if test_index is None else splits.test.subset(test_index),
        train_client_ids=pick(splits.train_client_ids, train_index),
        test_client_ids=pick(splits.test_client_ids, test_index),
    )


# --------------------------------------------------------------------------------------------
# Domains (feature skew) from config values
# --------------------------------------------------------------------------------------------

#: ``data.domains.kind`` → the :class:`Domain` field a plain number sets (tint takes (r, g, b) triples).
DOMAIN_KINDS = {
    "rotation": "rotation",
    "noise": "noise",
    "contrast": "contrast",
    "brightness": "brightness",
    "tint": "tint",
    "custom": None,
}
_DOMAIN_FIELDS = {f.name for f in dataclasses.fields(Domain)}


def _domain(kind: str, value: Any, where: str) -> Domain:
    """One Domain from one config value: a number (or an (r, g, b) list for tint), or a table of Domain fields."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - _DOMAIN_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown domain field(s) {', '.join(unknown)}; use {sorted(_DOMAIN_FIELDS)}")
        spec = dict(value)
        if spec.get("tint") is not None:
            spec["tint"] = tuple(float(t) for t in spec["tint"])
        spec.setdefault("name", _auto_name(spec))
        domain = Domain(**spec)
    elif kind == "custom":
        raise ValueError(f"{where}: kind 'custom' takes tables such as {{name = 'a', rotation = 30, noise = 0.1}}")
    elif kind == "tint":
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_number(v) for v in value):
            raise ValueError(f"{where}: a tint is three numbers [r, g, b], got {value!r}")
        tint = tuple(float(v) for v in value)
        domain = Domain(name="tint" + "-".join(f"{v:g}" for v in tint), tint=tint)  # type: ignore[arg-type]
    else:
        if not _number(value):
            raise ValueError(f"{where}: a {kind} domain is one number, got {value!r}")
        short = {"rotation": "rot", "brightness": "bright"}.get(kind, kind)
        domain = Domain(name=f"{short}{float(value):g}", **{DOMAIN_KINDS[kind]: float(value)})
    _check_domain(domain, where)
    return domain


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _auto_name(spec: dict[str, Any]) -> str:
    parts = [f"{k}{v:g}" for k, v in spec.items() if k in ("rotation", "noise", "contrast", "brightness")]
    if spec.get("tint") is not None:
        parts.append("tint" + "-".join(f"{v:g}" for v in spec["tint"]))
    return "_".join(parts) or "identity"


def _check_domain(domain: Domain, where: str) -> None:
    for name in ("rotation", "noise", "contrast", "brightness"):
        if not _number(getattr(domain, name)):
            raise ValueError(f"{where}: {name} must be a finite number, got {getattr(domain, name)!r}")
    if domain.noise < 0:
        raise ValueError(f"{where}: noise σ must be ≥ 0, got {domain.noise:g}")
    if domain.contrast < 0:
        raise ValueError(f"{where}: contrast must be ≥ 0, got {domain.contrast:g}")
    if "/" in domain.name or not domain.name.strip():
        raise ValueError(f"{where}: domain name {domain.name!r} must be non-empty and contain no '/'")


def make_domains(kind: str, values: Sequence[Any], key: str = "data.domains.train") -> list[Domain]:
    """The :class:`Domain` list of ``data.domains.train`` or ``.test`` (``key`` names it in errors)."""
    if kind not in DOMAIN_KINDS:
        raise ValueError(f"data.domains.kind: {kind!r} is not one of none, {', '.join(DOMAIN_KINDS)}")
    return [_domain(kind, value, f"{key}[{i}]") for i, value in enumerate(values)]


def _domains_of(cfg: Any, total_clients: int) -> tuple[list[Domain], np.ndarray | str, list[Domain]]:
    """Training domains, their assignment to clients, and held-out test domains, from ``[data.domains]``."""
    spec = cfg.domains
    test = make_domains(spec.kind, spec.test, "data.domains.test")
    if spec.sigma is not None:  # NIID-Bench: client i of N gets noise σ·i/N
        return noise_domains(total_clients, spec.sigma), np.arange(total_clients), test
    train = make_domains(spec.kind, spec.train, "data.domains.train")
    if len(train) > total_clients:
        raise ValueError(
            f"config key 'data.domains.train': {len(train)} domains for {total_clients} clients; "
            "every domain needs at least one client"
        )
    return train, spec.assignment, test


def _check_images(data: ArrayDataset, what: str) -> None:
    if data.x.dim() != 4:
        raise ValueError(
            f"config section [data.domains]: feature-skew domains transform images [N, C, H, W], but {what} "
            f"inputs have shape {tuple(data.x.shape[1:])} per record"
        )


def _with_channels(data: ArrayDataset, channels: int) -> ArrayDataset:
    if data.x.dim() != 4 or data.x.shape[1] == channels:
        return data
    return ArrayDataset(data.x.expand(-1, channels, -1, -1).contiguous(), data.y)


def _cuts(shares: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random split of ``range(count)`` into groups sized by ``shares`` (largest remainder)."""
    exact = shares / shares.sum() * count
    sizes = np.floor(exact).astype(np.int64)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: count - int(sizes.sum())]] += 1
    order = rng.permutation(count)
    return [np.sort(p) for p in np.split(order, np.cumsum(sizes)[:-1])]


# --------------------------------------------------------------------------------------------
# Colored MNIST: in-distribution and reversed test environments
# --------------------------------------------------------------------------------------------


def _recolour(env: ArrayDataset, probability: float, rng: np.random.Generator) -> ArrayDataset:
    """The same images and (noisy) labels with colours redrawn: colour = label with ``probability``.

    A Colored MNIST image holds its grey strokes in one of two channels and zeros in the other, so
    the channel sum recovers the grey image (:func:`fedgma.data.domains.colored_environments`).
    """
    grey = env.x.sum(dim=1)
    labels = env.y.numpy()
    colour = np.where(rng.random(len(labels)) < probability, labels, 1 - labels)
    x = torch.zeros_like(env.x)
    x[torch.arange(len(labels)), torch.as_tensor(colour)] = grey
    return ArrayDataset(x, env.y.clone())


def _colored_tests(splits: DatasetSplits, seed: int) -> tuple[ArrayDataset, dict[str, ArrayDataset], float] | None:
    """For a Colored MNIST dataset: (in-distribution test, {"ood/env<p>": the loader's test env}, p_id).

    The training environments, mixed in proportion to their records, colour each record like the
    label with probability p_id = Σ_e n_e p_e / Σ_e n_e; since an environment differs from another
    only in that probability, recolouring the test images with p_id draws them exactly from the
    training mixture. The loader's own test environment (IRM's reversed p = 0.1) is the OOD test.
    """
    meta = splits.metadata
    if not {"train_probabilities", "test_probability", "environment_of_client"} <= set(meta):
        return None
    env_of_client = np.asarray(meta["environment_of_client"])
    probabilities = np.asarray(meta["train_probabilities"], dtype=float)
    ids = splits.train_client_ids
    sizes = np.bincount(env_of_client[ids], minlength=len(probabilities)) if ids is not None else None
    weights = sizes if sizes is not None and sizes.sum() else np.ones(len(probabilities))
    p_id = float(np.dot(weights, probabilities) / weights.sum())
    in_distribution = _recolour(splits.test, p_id, numpy_rng(seed, "domains", 3))
    return in_distribution, {f"ood/env{meta['test_probability']:g}": splits.test}, p_id


# --------------------------------------------------------------------------------------------
# build_federated
# --------------------------------------------------------------------------------------------


def build_federated(data: Any, seed: int) -> FederatedDataset:
    """Load, partition, skew and split ``data`` (a ``[data]`` config section) for a run with ``seed``.

    See the module docstring for the steps. Raises ValueError (a :class:`DatasetError` for loading
    problems) naming the config key at fault: an empty client, a natural partition whose client
    count differs from the config's, domains on non-image data, an unknown loader option.
    """
    holdout = getattr(data, "holdout_clients", 0)
    total = data.num_clients + holdout
    splits = _subset(_load(data, total), getattr(data, "train_subset", None), getattr(data, "test_subset", None))
    labels = splits.train.y.numpy()
    parts = _PARTITIONS[data.partition](splits, data, total, seed_sequence(seed, "partition"))
    partition.check_partition(parts, len(splits.train))
    if len(parts) != total:
        raise ValueError(f"partition {data.partition!r} made {len(parts)} clients, expected {total}")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"partition {data.partition!r} left {len(empty)} client(s) with no data (e.g. client {empty[0]}); "
            "raise data.min_size or lower data.num_clients"
        )

    train, test = splits.train, splits.test
    extra: dict[str, ArrayDataset] = {}
    statistics: dict[str, Any] = {"dataset": splits.name, "partition": data.partition}
    domain_of: np.ndarray | None = None
    test_owner: list[np.ndarray] | None = None  # test records of each client (natural data with test ids)
    if splits.test_client_ids is not None and data.partition == "natural":
        _, ids = partition.natural(splits.train_client_ids)
        position = {v: i for i, v in enumerate(ids.tolist())}
        owner = np.array([position.get(v, -1) for v in splits.test_client_ids.tolist()], dtype=np.int64)
        test_owner = [np.flatnonzero(owner == i) for i in range(total)]

    spec = getattr(data, "domains", None)
    if spec is not None and spec.kind != "none":
        _check_images(train, "the training")
        domains, assignment, test_domains = _domains_of(data, total)
        train, domain_of = feature_skew(train, parts, domains, assignment, seed_sequence(seed, "domains", 0))
        test = _in_distribution_test(test, parts, domain_of, domains, test_owner, seed)
        if test_domains:
            ood = held_out_domains(splits.test, test_domains, seed_sequence(seed, "domains", 2))
            extra.update({f"ood/{name}": d for name, d in ood.items()})
        channels = max([train.x.shape[1], test.x.shape[1], *(d.x.shape[1] for d in extra.values())])
        train, test = _with_channels(train, channels), _with_channels(test, channels)
        extra = {k: _with_channels(v, channels) for k, v in extra.items()}
        statistics["domains"] = [d.name for d in domains]
        statistics["test_domains"] = [d.name for d in test_domains]

    colored = _colored_tests(dataclasses.replace(splits, test=test), seed)
    if colored is not None:
        test, ood, p_id = colored
        extra.update(ood)
        statistics["colour_agreement"] = {"train_mixture": p_id, "ood": splits.metadata["test_probability"]}

    holdout_ids = (
        np.sort(numpy_rng(seed, "partition", 1).choice(total, size=holdout, replace=False)) if holdout else np.array([])
    )
    is_holdout = np.zeros(total, dtype=bool)
    is_holdout[holdout_ids.astype(np.int64)] = True
    training = [i for i in range(total) if not is_holdout[i]]
    held = []
    for i in holdout_ids.tolist():
        client = train.subset(parts[i])
        if test_owner is not None and len(test_owner[i]):  # natural data: the client's own test records too
            own = test.subset(test_owner[i])
            client = ArrayDataset(torch.cat([client.x, own.x]), torch.cat([client.y, own.y]))
        held.append(client)

    num_classes = splits.num_classes
    stats = partition.partition_stats(labels, [parts[i] for i in training], num_classes).as_dict()
    statistics.update(stats)
    statistics["num_classes"] = num_classes
    statistics["test_size"] = len(test)
    if extra:
        statistics["extra_test_sizes"] = {k: len(v) for k, v in extra.items()}
    if domain_of is not None:
        statistics["domain_of_client"] = [statistics["domains"][d] for d in domain_of[training]]
    if data.partition == "natural":
        _, ids = partition.natural(splits.train_client_ids)
        statistics["client_ids"] = [_plain(ids[i]) for i in training]
    if holdout:
        statistics["holdout"] = {
            "clients": [int(i) for i in holdout_ids],
            "sizes": [len(c) for c in held],
            "label_counts": label_counts(labels, [parts[i] for i in holdout_ids.tolist()], num_classes).tolist(),
        }
    return FederatedDataset(
        clients=[train.subset(parts[i]) for i in training],
        test=test,
        num_classes=num_classes,
        extra_tests=extra,
        statistics=statistics,
        holdout_clients=held,
    )


def _in_distribution_test(
    test: ArrayDataset,
    parts: list[np.ndarray],
    domain_of: np.ndarray,
    domains: list[Domain],
    test_owner: list[np.ndarray] | None,
    seed: int,
) -> ArrayDataset:
    """The test set transformed like the training data: each record under one training domain.

    With per-client test records (natural data) a record takes its client's domain; otherwise the
    records are split among the domains at random in proportion to the domains' training records.
    Records of clients the test ids do not name fall back to the random split.
    """
    _check_images(test, "the test")
    rng = numpy_rng(seed, "domains", 1)
    if test_owner is not None:
        groups = [np.concatenate([test_owner[c] for c in np.flatnonzero(domain_of == d)] or [np.array([], int)])
                  for d in range(len(domains))]
        assigned = np.concatenate(groups) if groups else np.array([], int)
        rest = np.setdiff1d(np.arange(len(test)), assigned)
    else:
        groups = [np.array([], dtype=np.int64) for _ in domains]
        rest = np.arange(len(test))
    if len(rest):
        shares = np.bincount(domain_of, weights=[len(p) for p in parts], minlength=len(domains)).astype(float)
        for d, cut in enumerate(_cuts(shares, len(rest), rng)):
            groups[d] = np.sort(np.concatenate([groups[d], rest[cut]]).astype(np.int64))
    out, _ = feature_skew(test, groups, domains, np.arange(len(domains)), seed_sequence(seed, "domains", 1))
    return out


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# --------------------------------------------------------------------------------------------
# Validation split
# --------------------------------------------------------------------------------------------


def hold_out_validation(data: FederatedDataset, fraction: float, seed: int) -> FederatedDataset:
    """Move ``fraction`` of every client's records into one validation set, ``extra_tests["validation"]``.

    Hyper-parameters (e.g. the server learning rate) must be chosen on data drawn like the training
    data, never on the test set. Taking the same fraction from each client, *after* partitioning and
    any per-client feature transform, makes the validation set follow the clients' own mixture of
    labels and domains in every setting (label skew, quantity skew, rotated or coloured domains).
    Each client keeps at least one record. ``fraction = 0`` returns ``data`` unchanged.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"data.validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return data
    clients, held = [], []
    for client_id, client in enumerate(data.clients):
        order = numpy_rng(seed, "validation", client_id).permutation(len(client))
        cut = min(int(round(fraction * len(client))), len(client) - 1)
        held.append(client.subset(order[:cut]))
        clients.append(client.subset(order[cut:]))
    validation = ArrayDataset(torch.cat([h.x for h in held]), torch.cat([h.y for h in held]))
    statistics = {**data.statistics, "validation_size": len(validation), "sizes": [len(c) for c in clients]}
    return dataclasses.replace(
        data, clients=clients, extra_tests={**data.extra_tests, "validation": validation}, statistics=statistics
    )
