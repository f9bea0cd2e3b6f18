"""The federated view of a dataset: one tensor dataset per client, plus the test sets.

``build_federated`` turns a ``[data]`` config section and the run's seed into a
:class:`FederatedDataset`. Step by step:

1. load the dataset ``data.dataset.name`` with its validated options (the rest of the
   ``[data.dataset]`` table: Synthetic(α, β), a user file's ``path`` and columns, Colored MNIST's
   environments, …) through :data:`fedgma.registry.DATASETS` (cached: :mod:`fedgma.data.cache`);
   optionally keep a fixed random subset of the records (``data.train_subset`` / ``data.test_subset``);
2. split the training records among ``data.num_clients + data.holdout_clients`` clients with the
   partitioner ``data.partition.name`` and its options, built by :data:`fedgma.registry.PARTITIONERS`
   (:mod:`fedgma.data.partitioners`), and check the split covers every record exactly once;
3. feature skew (``[data.domains]``, :mod:`fedgma.data.feature_skew`): give every client a domain,
   transform the test set like the training domains, and make each held-out test domain a test set
   ``extra_tests["ood/<name>"]``. Colored MNIST datasets get the same treatment
   (:func:`fedgma.data.colored.colored_tests`): the test set is recoloured with the training
   environments' mixture and the reversed environment becomes ``extra_tests["ood/env<p>"]``;
4. hold out ``data.holdout_clients`` whole clients, chosen at random: they never train, and the
   simulator reports accuracy on each of them (mean and worst 10%);
5. record per-client statistics (:func:`fedgma.data.partition.partition_stats`) for
   ``partition.json``, ``fedgma partition`` and the heat-maps of :mod:`fedgma.plots`.

Every random choice derives from the config seed through :mod:`fedgma.seeding`, except the record
subsets, which are fixed (like the digits train/test split) so every seed sees the same data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedgma.data import partition
from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.cache import load_cached
from fedgma.data.colored import colored_tests
from fedgma.data.datasets import DatasetError
from fedgma.data.feature_skew import DOMAIN_KINDS, apply_domains, make_domains
from fedgma.data.partitioners import NaturalClientCountError, available_partitions
from fedgma.registry import DATASETS, PARTITIONERS
from fedgma.seeding import numpy_rng, seed_sequence

__all__ = [
    "DOMAIN_KINDS",
    "FederatedDataset",
    "available_partitions",
    "build_federated",
    "hold_out_validation",
    "label_counts",
    "make_domains",
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



def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """A [clients, classes] int64 array of how many records of each class every client holds."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts]) if parts else np.zeros((0, 0))


# --------------------------------------------------------------------------------------------
# The parts named by the [data] section
# --------------------------------------------------------------------------------------------


def _part(data: Any, key: str) -> tuple[str, dict[str, Any]]:
    """(name, options) of ``data.dataset`` or ``data.partition``: a config table with ``.name`` and ``.options``."""
    part = getattr(data, key)
    return part.name, dict(part.options)


def _load(name: str, options: dict[str, Any], data: Any, total_clients: int) -> DatasetSplits:
    """The dataset, loaded (or taken from the cache) with its options.

    A loader with a ``num_clients`` option (Synthetic(α, β)) left unset gets
    ``data.num_clients + data.holdout_clients``, so the dataset has the config's clients.
    """
    if options.get("num_clients") is None and "num_clients" in DATASETS.option_names(name):
        options = {**options, "num_clients": total_clients}
    try:
        DATASETS.validate(name, options)
    except ValueError as error:
        raise DatasetError(f"config key 'data.dataset': {error}") from None
    return load_cached(name, options, getattr(data, "data_dir", None), getattr(data, "download", False))


def _partition(name: str, options: dict[str, Any], splits: DatasetSplits, total: int, holdout: int,
               seed: int) -> list[np.ndarray]:
    """The partitioner's parts, checked to cover every record once with ``total`` non-empty clients."""
    try:
        partitioner = PARTITIONERS.build(name, options)
    except ValueError as error:
        raise ValueError(f"config key 'data.partition': {error}") from None
    try:
        parts = partitioner(splits, total, seed_sequence(seed, "partition"))
    except NaturalClientCountError as error:
        raise ValueError(
            f"config key 'data.num_clients': dataset {error.dataset!r} has {error.found} natural clients, but "
            f"data.num_clients + data.holdout_clients = {total}; set data.num_clients = {error.found - holdout}"
        ) from None
    partition.check_partition(parts, len(splits.train))
    if len(parts) != total:
        raise ValueError(f"partition {name!r} made {len(parts)} clients, expected {total}")
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:  # the hint names only options this partitioner takes
        fixes = (["raise data.partition.min_size"] if "min_size" in PARTITIONERS.option_names(name) else []) + [
            f"lower data.num_clients (now {total - holdout}, for {len(splits.train)} training records)"
        ]
        raise ValueError(
            f"partition {name!r} left {len(empty)} client(s) with no data (e.g. client {empty[0]}); "
            + " or ".join(fixes)
        )
    return parts


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
    dataset, dataset_options = _part(data, "dataset")
    partition_name, partition_options = _part(data, "partition")
    splits = _subset(
        _load(dataset, dataset_options, data, total), getattr(data, "train_subset", None),
        getattr(data, "test_subset", None),
    )
    labels = splits.train.y.numpy()
    parts = _partition(partition_name, partition_options, splits, total, holdout, seed)

    train, test = splits.train, splits.test
    extra: dict[str, ArrayDataset] = {}
    statistics: dict[str, Any] = {"dataset": splits.name, "partition": partition_name}
    domain_of: np.ndarray | None = None
    test_owner: list[np.ndarray] | None = None  # test records of each client (natural data with test ids)
    if splits.test_client_ids is not None and partition_name == "natural":
        _, ids = partition.natural(splits.train_client_ids)
        position = {v: i for i, v in enumerate(ids.tolist())}
        owner = np.array([position.get(v, -1) for v in splits.test_client_ids.tolist()], dtype=np.int64)
        test_owner = [np.flatnonzero(owner == i) for i in range(total)]

    spec = getattr(data, "domains", None)
    if spec is not None and spec.kind != "none":
        skewed = apply_domains(spec, train, test, parts, test_owner, seed)
        train, test, extra, domain_of = skewed.train, skewed.test, skewed.extra, skewed.domain_of
        statistics["domains"] = skewed.domains
        statistics["test_domains"] = skewed.test_domains

    colored = colored_tests(dataclasses.replace(splits, test=test), seed)
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

    _check_evaluation_sets(splits.name, test, extra, held, holdout_ids)
    num_classes = splits.num_classes
    stats = partition.partition_stats(labels, [parts[i] for i in training], num_classes).as_dict()
    statistics.update(stats)
    statistics["num_classes"] = num_classes
    statistics["test_size"] = len(test)
    if extra:
        statistics["extra_test_sizes"] = {k: len(v) for k, v in extra.items()}
    if domain_of is not None:
        statistics["domain_of_client"] = [statistics["domains"][d] for d in domain_of[training]]
    if partition_name == "natural":
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


def _check_evaluation_sets(
    dataset: str, test: ArrayDataset, extra: dict[str, ArrayDataset], held: list[ArrayDataset], held_ids: np.ndarray
) -> None:
    """ValueError, one line saying how to fix it, when an evaluation set has no records.

    An accuracy and a loss over zero records would be reported as 0.0 and the run would look fine;
    every set the simulator evaluates (the test set, each extra test set, each held-out client)
    must hold at least one record.
    """
    if len(test) == 0:
        raise ValueError(
            f"config key 'data.dataset': data set {dataset!r} has no test records, so test accuracy and loss would "
            "be computed over nothing; give it test records (a user file: data.dataset.test_fraction > 0, or a "
            "test file or x_test with records)"
        )
    for key, evaluation in extra.items():
        if len(evaluation) == 0:
            raise ValueError(
                f"config key 'data.domains': the evaluation set {key!r} of data set {dataset!r} has no records "
                f"(the test set has {len(test)}); use a larger test set (data.test_subset) or fewer test domains"
            )
    for client, data in zip(held_ids.tolist(), held, strict=True):
        if len(data) == 0:
            raise ValueError(
                f"config key 'data.holdout_clients': held-out client {int(client)} has no records; "
                "lower data.holdout_clients or data.num_clients"
            )


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

    Raises ValueError (one line) for a fraction outside [0, 1), or one that takes no record at all
    (every client smaller than 1 / (2·fraction) records), since validation over zero records would
    report 0.0.
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
    if sum(len(h) for h in held) == 0:
        largest = max(len(c) for c in data.clients)
        fix = (
            f"raise it to {0.505 / largest:.3g} or more, or set it to 0"
            if largest > 1
            else "every client holds one record and keeps it; set it to 0"
        )
        raise ValueError(
            f"data.validation_fraction = {fraction:g} takes no record from any client (round(fraction × size) is 0 "
            f"for every client; the largest holds {largest}), so validation would be computed over nothing; {fix}"
        )
    validation = ArrayDataset(torch.cat([h.x for h in held]), torch.cat([h.y for h in held]))
    statistics = {**data.statistics, "validation_size": len(validation), "sizes": [len(c) for c in clients]}
    return dataclasses.replace(
        data, clients=clients, extra_tests={**data.extra_tests, "validation": validation}, statistics=statistics
    )
