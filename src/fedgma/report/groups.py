"""Grouping runs: seeds of one configuration pooled, the server lr chosen on validation (issue 15's
protocol: :func:`~fedgma.report.protocol.select_lr`), every method paired with plain averaging of the same
setting, and τ sweeps found.
"""

from __future__ import annotations

import functools
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fedgma.config import flatten
from fedgma.registry import AGGREGATORS
from fedgma.report.configs import describe, format_value, headline_options, identity, is_method_key, varying_keys
from fedgma.report.protocol import (
    LAST_FRACTION,
    LrChoice,
    best_on_validation,
    curve_area,
    last_fraction_mean,
    select_lr,
)
from fedgma.report.runs import RunRecord

__all__ = ["Group", "comparisons", "extra_accuracies", "make_groups", "method_label", "pair_groups", "setting_keys",
           "setting_rank", "swept_keys", "tau_families"]


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
    fraction: float = LAST_FRACTION  # the protocol's metrics average the last 20% of rounds
    lr_choice: LrChoice | None = None  # set where the server lr was chosen among several on validation
    lr_seeds: int = 0  # the fewest seeds any lr of that choice had

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
        """τ of GMA and of the aggregators that share its options (the ablations); None for the others."""
        try:
            field_ = AGGREGATORS.options(self.aggregator).model_fields.get("threshold")
        except ValueError:  # an aggregator this version does not register: its own τ if recorded
            field_ = None
        value = self.flat.get("server.aggregator.threshold")
        if field_ is None:
            return None if value is None or self.aggregator == "mean" else float(value)
        return float(field_.default if value is None else value)

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

    def last(self, key: str = "test_accuracy") -> dict[int, float]:
        """Seed -> the mean of ``key`` over the last ``fraction`` of the run's rounds (the protocol's metric,
        :func:`~fedgma.report.protocol.last_fraction_mean`); runs that never evaluated ``key`` are left out."""
        return {int(r.summary["seed"]): last_fraction_mean(r.metrics, key, fraction=self.fraction)
                for r in self.runs if _has(r, key)}

    def area(self, key: str = "test_accuracy") -> dict[int, float]:
        """Seed -> the area under the learning curve of ``key`` divided by its span, from round 0 at the
        untrained model's value where the summary holds it (:func:`~fedgma.report.protocol.curve_area`);
        a curve of a single evaluation has no area and is left out."""
        areas = {}
        for run in self.runs:
            if not _has(run, key):
                continue
            initial = (run.summary.get("initial") or {}).get(key)
            points = sum(1 for m in run.metrics if m.get(key) is not None) + (initial is not None)
            if points >= 2:
                areas[int(run.summary["seed"])] = curve_area(run.metrics, key, initial)
        return areas

    def at_best_validation(self, key: str = "test_accuracy") -> dict[int, float]:
        """Seed -> ``key`` at the evaluation with the best validation accuracy (the first of equals): the only
        "best" accuracy the report shows, chosen on validation, never on the test set. Runs without a
        validation split are left out."""
        chosen = {}
        for run in self.runs:
            best = best_on_validation(run.metrics, key)
            if best is not None:
                chosen[int(run.summary["seed"])] = float(best[key])
        return chosen

    def by_seed(self, key: str = "test_accuracy") -> dict[int, float]:
        return {int(r.summary["seed"]): float(r.summary["final"][key]) for r in self.runs if key in r.summary["final"]}

    def pair_key(self) -> tuple[str, str]:
        """What GMA is paired on: the setting and every config value but seed and aggregation knobs."""
        rest = {k: v for k, v in self.flat.items()
                if k not in _PAIRING_IGNORES and not k.startswith(_PAIRING_IGNORED_PREFIX)}
        return self.setting, json.dumps(rest, sort_keys=True, default=str)

    def lr_key(self) -> tuple[str, str]:
        """Configurations that differ only in the server lr (and seed) share this key."""
        return _lr_key(self.folder, self.flat)


def _lr_key(folder: str, flat: dict[str, Any]) -> tuple[str, str]:
    rest = {k: v for k, v in flat.items() if k not in {"seed", "name", "server.optimizer.lr"}}
    return folder, json.dumps(rest, sort_keys=True, default=str)


def _has(run: RunRecord, key: str) -> bool:
    return any(m.get(key) is not None for m in run.metrics)


def method_label(group: Group, method_keys: list[str]) -> str:
    """``"fedavg + gma (τ=0.4)"``: algorithm, aggregator (τ for GMA) and every other swept method key."""
    label = f"{group.algorithm} + {group.aggregator}"
    shown = [k for k in method_keys if k not in ("algorithm", "server.aggregator.name", "server.aggregator.threshold")
             and group.flat.get(k) is not None]
    extra = [f"τ={format_value(group.threshold)}"] if group.threshold is not None else []
    if shown:
        extra.append(describe(group.flat, shown))
    return label + (f" ({', '.join(extra)})" if extra else "")


def swept_keys(groups: list[Group]) -> list[str]:
    """The config keys whose values differ between ``groups`` (setting keys first, then method keys)."""
    return varying_keys(g.flat for g in groups)


def make_groups(runs: Iterable[RunRecord], metric: str = "validation_accuracy", fraction: float = LAST_FRACTION,
                diverged: Iterable[dict[str, Any]] = ()) -> list[Group]:
    """Group runs by their resolved configs: runs whose configs differ only in seed and name (and that sit
    in the same sub-folder) are one group. Every key that differs between groups is swept: setting keys
    name the group's ``setting``, method keys its ``label`` (:class:`Group`).

    Where groups differ only in the server lr, the lr is chosen by
    :func:`~fedgma.report.protocol.select_lr`: the best mean over seeds of ``metric`` (the validation
    split, never the test set) averaged over the last ``fraction`` of rounds; runs in ``diverged``
    (:func:`~fedgma.report.runs.find_diverged` items with their ``setting``) score 0 at their lr. That
    group is marked selected, the others not, and every group of the family keeps the choice
    (``lr_choice``: scores and whether the pick is on an edge of the grid). Without a validation split
    every lr is kept.

    Raises:
        ValueError: two runs with the same configuration and seed (from two folders, say), which would
            count one seed twice.
    """
    by_config: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for run in runs:
        flat = {**config_defaults(), **flatten(run.config)}
        by_config[(run.setting, identity(flat))].append(run)
    groups = [Group(folder, "", sorted(members, key=lambda r: r.summary["seed"]), folder=folder, fraction=fraction)
              for (folder, _), members in sorted(by_config.items())]
    for group in groups:
        seen: dict[int, RunRecord] = {}
        for run in group.runs:
            seed = int(run.summary["seed"])
            if seed in seen:
                raise ValueError(f"runs {seen[seed].path} and {run.path} have the same configuration and seed {seed}; "
                                 "report one of them")
            seen[seed] = run
    keys = swept_keys(groups)
    in_setting = sorted((k for k in keys if not is_method_key(k)), key=setting_rank)
    method_keys = [k for k in keys if is_method_key(k)]
    # a swept part's headline options are shown even where they do not vary: "dirichlet, Dirichlet α=0.1" vs "iid"
    headline = [k for k in headline_options(k.removesuffix(".name") for k in in_setting if k.endswith(".name"))
                if k not in keys]
    labelled = sorted([*in_setting, *headline], key=setting_rank)
    for group in groups:
        flat = group.flat
        group.values = {k: flat.get(k) for k in keys}
        shown = describe(flat, [k for k in labelled if flat.get(k) is not None])  # no "α=—" for IID
        group.setting = " · ".join(part for part in (group.folder, shown) if part)
        group.label = method_label(group, method_keys)
    by_lr: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        by_lr[group.lr_key()].append(group)
    failed: dict[tuple[str, str], dict[float, dict[int, None]]] = defaultdict(lambda: defaultdict(dict))
    for item in diverged:
        if item.get("config"):
            flat = {**config_defaults(), **flatten(item["config"])}
            if flat.get("server.optimizer.lr") is not None:
                failed[_lr_key(item.get("setting", ""), flat)][float(flat["server.optimizer.lr"])][
                    int(flat.get("seed", 0))] = None
    for key, family in by_lr.items():
        runs_by_lr: dict[float, dict[int, Any]] = {g.server_lr: {int(r.summary["seed"]): r.metrics for r in g.runs}
                                                   for g in family}
        for lr, seeds in failed.get(key, {}).items():
            runs_by_lr.setdefault(lr, {}).update({s: None for s in seeds if s not in runs_by_lr.get(lr, {})})
        if len(runs_by_lr) < 2:
            continue
        if not all(_has(r, metric) for g in family for r in g.runs):
            continue  # no validation split: keep every lr (GMA is then paired at equal lr)
        choice = select_lr(runs_by_lr, metric, fraction=fraction, min_seeds=1)
        for group in family:
            group.selected = group.server_lr == choice.lr
            group.lr_choice = choice
            group.lr_seeds = min(len(seeds) for seeds in runs_by_lr.values())
    return groups


def extra_accuracies(groups: Iterable[Group], per_domain: bool = True) -> list[str]:
    """Accuracy keys besides test (validation, ood, ...), in a stable order; ``per_domain=False`` leaves
    out the per-domain ones (``ood/<domain>_accuracy``), whose mean is ``ood_accuracy``."""
    keys = {k for g in groups for r in g.runs for k in r.summary["final"] if k.endswith("_accuracy")}
    keys.discard("test_accuracy")
    if not per_domain:
        keys = {k for k in keys if "/" not in k}
    return sorted(keys, key=lambda k: (k != "validation_accuracy", k))


def comparisons(groups: list[Group], baseline: str = "mean") -> list[tuple[Group, Group]]:
    """(plain averaging, method) pairs: every selected group of another aggregator (``gma``, its ablations,
    robust rules, ...) with the selected ``baseline`` group of the same setting, that is the same
    configuration except the seed, the aggregator and its options, and the server lr (each method at its
    own lr, chosen on validation).

    If several baseline groups match (no validation split to choose a server lr), a method is paired with
    the one at its own server lr.
    """
    bases: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.selected and group.aggregator == baseline:
            bases[group.pair_key()].append(group)
    pairs = []
    for group in groups:
        if not group.selected or group.aggregator == baseline:
            continue
        candidates = bases.get(group.pair_key(), [])
        if len(candidates) > 1:
            candidates = [m for m in candidates if m.server_lr == group.server_lr]
        if len(candidates) == 1:
            pairs.append((candidates[0], group))
    return pairs


def pair_groups(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(plain averaging, GMA) pairs (:func:`comparisons` restricted to ``gma``)."""
    return [(base, group) for base, group in comparisons(groups) if group.aggregator == "gma"]


def setting_keys(groups: Iterable[Group]) -> list[str]:
    """The config keys that tell the settings of ``groups`` apart: those that differ between them, less the
    seed, the aggregator and its options and the server lr (what a comparison varies within a setting)."""
    flats = [{k: v for k, v in g.flat.items()
              if k not in _PAIRING_IGNORES and not k.startswith(_PAIRING_IGNORED_PREFIX)} for g in groups]
    return sorted(varying_keys(flats), key=setting_rank)


def setting_rank(key: str) -> int:
    """Data first, then the axes of GMA's map, then the rest (a stable sort keeps their order)."""
    return next((i for i, prefix in enumerate(_SETTING_ORDER) if key == prefix or key.startswith(prefix + ".")),
                len(_SETTING_ORDER))


#: The order of a setting's keys in the gains table: data first, then the axes of GMA's map, then the rest.
_SETTING_ORDER = ("data.dataset", "data.partition.name", "data.partition", "server.clients_per_round",
                  "client.local_epochs", "algorithm")


def tau_families(groups: list[Group]) -> list[list[Group]]:
    """Sets of selected GMA groups that differ only in τ (three values or more): τ sweeps."""
    families: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        if group.aggregator == "gma" and group.selected:
            families[group.pair_key()].append(group)
    return [sorted(f, key=lambda g: g.threshold or 0) for f in families.values()
            if len({g.threshold for g in f}) >= 3]
