"""Grouping runs: seeds of one configuration pooled, the server lr chosen on validation, GMA paired with
plain averaging of the same setting and algorithm, and τ sweeps found.
"""

from __future__ import annotations

import functools
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedgma.config import flatten
from fedgma.registry import AGGREGATORS
from fedgma.report.configs import describe, format_value, identity, is_method_key, varying_keys
from fedgma.report.runs import RunRecord

__all__ = ["Group", "extra_accuracies", "make_groups", "method_label", "pair_groups", "swept_keys",
           "tau_families"]


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
    """Runs of one configuration that differ only in their seed (and name).

    ``setting`` is what the configuration is compared in: the run folder's sub-folder (if any) and the
    values of the swept setting keys (``"Dirichlet α=0.1"``; ``""`` when nothing but the method
    differs); ``label`` names the method (``"fedavg + gma (τ=0.4)"``, with every swept method key), so
    that within one setting every group has its own label. ``values`` holds every swept key's value.
    """

    setting: str
    label: str
    runs: list[RunRecord]
    selected: bool = True  # False: another server lr won on validation
    values: dict[str, Any] = field(default_factory=dict)
    folder: str = ""

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


def method_label(group: Group, method_keys: list[str]) -> str:
    """``"fedavg + gma (τ=0.4)"``: algorithm, aggregator (τ for GMA) and every other swept method key."""
    label = f"{group.algorithm} + {group.aggregator}"
    shown = [k for k in method_keys if k not in ("algorithm", "server.aggregator.name", "server.aggregator.threshold")
             and group.flat.get(k) is not None]
    extra = [f"τ={format_value(group.threshold)}"] if group.aggregator == "gma" else []
    if shown:
        extra.append(describe(group.flat, shown))
    return label + (f" ({', '.join(extra)})" if extra else "")


def swept_keys(groups: list[Group]) -> list[str]:
    """The config keys whose values differ between ``groups`` (setting keys first, then method keys)."""
    return varying_keys(g.flat for g in groups)


def make_groups(runs: Iterable[RunRecord], metric: str = "validation_accuracy") -> list[Group]:
    """Group runs by their resolved configs: runs whose configs differ only in seed and name (and that sit
    in the same sub-folder) are one group. Every key that differs between groups is swept: setting keys
    name the group's ``setting``, method keys its ``label`` (:class:`Group`).

    Where groups differ only in the server lr, the lr with the best mean final ``metric`` (the validation
    split, never the test set) is marked selected and the others not.
    """
    by_config: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        flat = {**config_defaults(), **flatten(run.config)}
        by_config[(run.setting, identity(flat))].append(run)
    groups = [Group(folder, "", sorted(members, key=lambda r: r.summary["seed"]), folder=folder)
              for (folder, _), members in sorted(by_config.items())]
    keys = swept_keys(groups)
    setting_keys = [k for k in keys if not is_method_key(k)]
    method_keys = [k for k in keys if is_method_key(k)]
    for group in groups:
        flat = group.flat
        group.values = {k: flat.get(k) for k in keys}
        group.setting = " · ".join(part for part in (group.folder, describe(flat, setting_keys)) if part)
        group.label = method_label(group, method_keys)
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
