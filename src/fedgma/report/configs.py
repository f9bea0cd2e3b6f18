"""What differs between runs: the config keys whose values are not the same in every run, with
readable names, split into the *setting* (data, faults, ...: what is compared on) and the *method*
(algorithm, aggregator, server optimizer: what is compared).

Configs are the run folders' resolved ``config.toml`` read through :func:`fedgma.config.upgrade_raw`
(:func:`fedgma.report.runs.read_config`) and flattened to dotted keys, so a sweep written into one flat
folder is told apart by its configs, never by folder names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["IDENTITY_IGNORES", "METHOD_PREFIXES", "describe", "format_value", "identity", "is_method_key",
           "readable_name", "varying_keys"]

#: Keys that never define a configuration: runs that differ only in these are seeds of one configuration.
IDENTITY_IGNORES = frozenset({"seed", "name"})

#: Keys (and their sub-keys) that are the method being compared rather than the setting it is compared in.
METHOD_PREFIXES = ("algorithm", "client.algorithm", "server.aggregator", "server.optimizer")

#: Readable names of the keys researchers sweep most; any other key gets a name from its last components.
_NAMES = {
    "algorithm": "algorithm",
    "server.aggregator.name": "aggregator",
    "server.aggregator.threshold": "τ",
    "server.optimizer.name": "server optimizer",
    "server.optimizer.lr": "server lr",
    "server.optimizer.momentum": "server momentum",
    "server.clients_per_round": "clients per round",
    "client.algorithm.name": "client algorithm",
    "client.lr": "client lr",
    "client.local_epochs": "local epochs",
    "client.local_steps": "local steps",
    "client.prox_mu": "FedProx μ",
    "data.dataset.name": "dataset",
    "data.partition.name": "partition",
    "data.partition.alpha": "Dirichlet α",
    "data.num_clients": "clients",
    "model.name": "model",
}


#: A setting part's options that say what the part is (the skew of a Dirichlet split): shown in a setting's
#: label even where they do not vary, once the part itself does. Not the server optimizer's lr or momentum:
#: they are a method's tuned values, not a setting.
_HEADLINE = {"data.partition": ("data.partition.alpha",)}


def headline_options(parts: Iterable[str]) -> list[str]:
    """The headline options of ``parts`` (``"data.partition"`` -> ``data.partition.alpha``): what a setting's
    label shows even when they do not vary, once the part itself does (``dirichlet, Dirichlet α=0.1``
    against ``iid``, not a bare ``dirichlet``)."""
    return [k for p in parts for k in _HEADLINE.get(p, ())]


def is_method_key(key: str) -> bool:
    """Whether dotted ``key`` belongs to the method (algorithm, aggregator, server optimizer)."""
    return any(key == p or key.startswith(p + ".") for p in METHOD_PREFIXES)


def identity(flat: Mapping[str, Any]) -> str:
    """A flattened config without its seed and name, as canonical JSON: equal for seeds of one configuration."""
    return json.dumps({k: v for k, v in flat.items() if k not in IDENTITY_IGNORES}, sort_keys=True, default=str)


def varying_keys(flats: Iterable[Mapping[str, Any]]) -> list[str]:
    """The dotted keys whose value is not the same in every flattened config of ``flats`` (a key some
    configs lack counts as differing), seed and name left out, in a stable order: setting keys, then
    method keys, each in key order. An option of a part (``server.aggregator.threshold``) counts only
    where it differs between configs that use the same part (two GMA runs with different τ), not
    because another part (``mean``) has no such option."""
    flats = list(flats)
    keys = sorted({k for f in flats for k in f} - IDENTITY_IGNORES)

    def differs(key: str) -> bool:
        part = _part_of(key)
        if part is None:
            return len({json.dumps(f.get(key, "<missing>"), default=str) for f in flats}) > 1
        # a part's option differs only between runs of the same part: gma's τ is not "swept" against mean
        by_name: dict[str, set[str]] = {}
        for f in flats:
            by_name.setdefault(str(f.get(f"{part}.name")), set()).add(json.dumps(f.get(key, "<missing>"), default=str))
        return any(len(values) > 1 for values in by_name.values())

    return sorted((k for k in keys if differs(k)), key=lambda k: (is_method_key(k), k))


def _part_of(key: str) -> str | None:
    """``"server.aggregator"`` for ``"server.aggregator.threshold"``: the part whose option ``key`` is, if any."""
    from fedgma.report.runs import PART_KEYS

    return next((p for p in PART_KEYS if key.startswith(p + ".") and key != f"{p}.name"), None)


def readable_name(key: str, among: Iterable[str] = ()) -> str:
    """A column or legend name for dotted ``key``: a known name (``server.optimizer.lr`` → ``server lr``),
    else its last component with ``_`` as spaces (``faults.sign_flip`` → ``sign flip``), or its last two
    when another key of ``among`` ends the same way."""
    if key in _NAMES:
        return _NAMES[key]
    parts = key.split(".")
    clash = sum(1 for other in among if other.split(".")[-1] == parts[-1]) > 1
    tail = parts[-2:] if (clash or parts[-1] == "name") and len(parts) > 1 else parts[-1:]
    if tail[-1] == "name":
        tail = tail[:-1]
    return " ".join(tail).replace("_", " ")


def format_value(value: Any) -> str:
    """A config value as shown in tables and legends: ``0.1``, ``gma``, ``true``, ``—`` for a missing one."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def describe(flat: Mapping[str, Any], keys: Iterable[str], sep: str = ", ") -> str:
    """``"Dirichlet α=0.1, sign flip=0.2"``: the values of ``keys`` in ``flat`` with readable names."""
    keys = list(keys)
    return sep.join(f"{readable_name(k, keys)}={format_value(flat.get(k))}" for k in keys)
