"""Grouping runs: seeds of one configuration pooled, the server lr chosen on validation, GMA paired with
plain averaging of the same setting and algorithm, and τ sweeps found.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedgma.config import flatten
from fedgma.registry import AGGREGATORS
from fedgma.report.runs import RunRecord, group_runs

__all__ = ["Group", "extra_accuracies", "make_groups", "pair_groups", "tau_families"]


#: Config keys that do not define *what* is compared: the seed, the name, the aggregator and its
#: options, and the server lr (GMA is paired with plain averaging of the same setting and algorithm
#: whatever its τ or lr).
_PAIRING_IGNORES = {"seed", "name", "server.optimizer.lr"}
_PAIRING_IGNORED_PREFIX = "server.aggregator."


@functools.cache
def config_defaults() -> dict[str, Any]:
    from fedgma.config import Config, config_to_dict

    return flatten(config_to_dict(Config()))


@dataclass
class Group:
    """Runs of one setting and configuration that differ only in their seed."""

    setting: str
    label: str
    runs: list[RunRecord]
    selected: bool = True  # False: another server lr won on validation

    @property
    def flat(self) -> dict[str, Any]:
        """The run's config, flattened, over today's defaults: a key a run folder lacks (written before
        the key existed) takes its default, which is what that run did."""
        return {**config_defaults(), **flatten(self.runs[0].config)}

    @property
    def algorithm(self) -> str:
        return str(self.runs[0].summary["algorithm"])

    @property
    def aggregator(self) -> str:
        return str(self.runs[0].summary["aggregator"])

    @property
    def threshold(self) -> float | None:
        if self.aggregator != "gma":
            return None
        default = AGGREGATORS.options("gma").model_fields["threshold"].default
        return float(self.flat.get("server.aggregator.threshold", default))

    @property
    def server_lr(self) -> float:
        lr = self.flat.get("server.optimizer.lr")
        if lr is None:
            raise ValueError(f"run {self.runs[0].path}: config.toml has no server.optimizer.lr (nor server.lr)")
        return float(lr)

    @property
    def seeds(self) -> list[int]:
        return [int(r.summary["seed"]) for r in self.runs]

    def final(self, key: str = "test_accuracy") -> list[float]:
        return [float(r.summary["final"][key]) for r in self.runs if key in r.summary["final"]]

    def best(self) -> list[float]:
        return [float(r.summary["best"]["test_accuracy"]) for r in self.runs]

    def by_seed(self, key: str = "test_accuracy") -> dict[int, float]:
        return {int(r.summary["seed"]): float(r.summary["final"][key]) for r in self.runs if key in r.summary["final"]}

    def pair_key(self) -> tuple[str, str]:
        """What GMA is paired on: the setting and every config value but seed and aggregation knobs."""
        rest = {k: v for k, v in self.flat.items()
                if k not in _PAIRING_IGNORES and not k.startswith(_PAIRING_IGNORED_PREFIX)}
        return self.setting, json.dumps(rest, sort_keys=True, default=str)

    def lr_key(self) -> tuple[str, str]:
        """Configurations that differ only in the server lr (and seed) share this key."""
        rest = {k: v for k, v in self.flat.items() if k not in {"seed", "name", "server.optimizer.lr"}}
        return self.setting, json.dumps(rest, sort_keys=True, default=str)


def make_groups(runs: Iterable[RunRecord], metric: str = "validation_accuracy") -> list[Group]:
    """Group runs by setting and label; where only the server lr differs, mark the lr with the best mean
    final ``metric`` (the validation split, never the test set) as selected and the others not."""
    groups = [Group(g[0].setting, label, sorted(g, key=lambda r: r.summary["seed"]))
              for label, g in group_runs(runs).items()]
    by_lr: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        by_lr[group.lr_key()].append(group)
    for family in by_lr.values():
        if len(family) < 2:
            continue
        if not all(group.final(metric) for group in family):
            continue  # no validation split: keep every lr (GMA is then paired at equal lr)
        best = max(family, key=lambda g: (statistics.fmean(g.final(metric)), -g.server_lr))
        for group in family:
            group.selected = group is best
    return groups


def extra_accuracies(groups: Iterable[Group], per_domain: bool = True) -> list[str]:
    """Accuracy keys besides test (validation, ood, ...), in a stable order; ``per_domain=False`` leaves
    out the per-domain ones (``ood/<domain>_accuracy``), whose mean is ``ood_accuracy``."""
    keys = {k for g in groups for r in g.runs for k in r.summary["final"] if k.endswith("_accuracy")}
    keys.discard("test_accuracy")
    if not per_domain:
        keys = {k for k in keys if "/" not in k}
    return sorted(keys, key=lambda k: (k != "validation_accuracy", k))


def pair_groups(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(plain averaging, GMA) pairs: same setting and configuration except the aggregation knobs.

    Only selected groups take part; if several plain-averaging groups match (no validation to choose
    a server lr), GMA is paired with the one at its own server lr.
    """
    means: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.selected and group.aggregator == "mean":
            means[group.pair_key()].append(group)
    pairs = []
    for group in groups:
        if not group.selected or group.aggregator != "gma":
            continue
        candidates = means.get(group.pair_key(), [])
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.server_lr == group.server_lr]
        if len(candidates) == 1:
            pairs.append((candidates[0], group))
    return pairs


def tau_families(groups: list[Group]) -> list[list[Group]]:
    """Sets of selected GMA groups that differ only in τ (three values or more): τ sweeps."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.aggregator == "gma" and group.selected:
            families[group.pair_key()].append(group)
    return [sorted(f, key=lambda g: g.threshold or 0) for f in families.values()
            if len({g.threshold for g in f}) >= 3]
