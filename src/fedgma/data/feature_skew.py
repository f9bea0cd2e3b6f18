"""Feature skew from a ``[data.domains]`` config table: parse the domains, then transform the data.

:func:`make_domains` turns config values into :class:`fedgma.data.domains.Domain` objects (a number
per domain for rotation, noise, contrast or brightness, an [r, g, b] list for tint, or a table of
Domain fields). :func:`apply_domains` gives every client a training domain, transforms the global
test set *like the training domains* (each test record takes a training domain, in the
proportions of the training records, or its own client's domain for natural data), so
``test_accuracy`` is in-distribution, and makes each held-out test domain a test set
``ood/<name>`` that no client saw. Randomness comes from the run seed's "domains" streams 0, 1, 2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedgma.data.arrays import ArrayDataset
from fedgma.data.domains import Domain, feature_skew, held_out_domains, noise_domains
from fedgma.seeding import numpy_rng, seed_sequence

__all__ = ["DOMAIN_KINDS", "SkewedData", "apply_domains", "make_domains"]

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


def _domains_of(spec: Any, total_clients: int) -> tuple[list[Domain], np.ndarray | str, list[Domain]]:
    """Training domains, their assignment to clients, and held-out test domains, from ``[data.domains]``."""
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



@dataclass
class SkewedData:
    """The data after feature skew: ``domain_of[i]`` is client i's index into ``domains``; ``extra``
    maps ``"ood/<name>"`` to each held-out test domain's test set."""

    train: ArrayDataset
    test: ArrayDataset
    extra: dict[str, ArrayDataset]
    domain_of: np.ndarray
    domains: list[str]
    test_domains: list[str]


def apply_domains(
    spec: Any,
    train: ArrayDataset,
    test: ArrayDataset,
    parts: list[np.ndarray],
    test_owner: list[np.ndarray] | None,
    seed: int,
) -> SkewedData:
    """Apply the ``[data.domains]`` table ``spec`` to image data [N, C, H, W] split into ``parts``.

    ``test_owner[i]`` (natural data only) holds client i's own test records. Every output has the
    most channels any domain produced (a tint makes grey images RGB).

    Raises:
        ValueError: non-image inputs, more training domains than clients, or a bad domain value.
    """
    _check_images(train, "the training")
    domains, assignment, test_domains = _domains_of(spec, len(parts))
    skewed, domain_of = feature_skew(train, parts, domains, assignment, seed_sequence(seed, "domains", 0))
    skewed_test = _in_distribution_test(test, parts, domain_of, domains, test_owner, seed)
    extra: dict[str, ArrayDataset] = {}
    if test_domains:
        ood = held_out_domains(test, test_domains, seed_sequence(seed, "domains", 2))
        extra.update({f"ood/{name}": d for name, d in ood.items()})
    channels = max([skewed.x.shape[1], skewed_test.x.shape[1], *(d.x.shape[1] for d in extra.values())])
    return SkewedData(
        train=_with_channels(skewed, channels),
        test=_with_channels(skewed_test, channels),
        extra={k: _with_channels(v, channels) for k, v in extra.items()},
        domain_of=domain_of,
        domains=[d.name for d in domains],
        test_domains=[d.name for d in test_domains],
    )
