"""Registries of the parts a run is composed of, each part with its own validated options.

A part (an aggregation rule, a server optimizer, a client algorithm, a partitioner, a data set
loader, a backend, a model) is registered under a name together with a pydantic model of its
options. :meth:`Registry.validate` checks a part's options against that model, so an unknown
option, an option the part does not use, or a value out of range is one line naming the part, the
option and what is allowed (with a did-you-mean); :meth:`Registry.build` validates, then calls the
part's factory. This is declearn's registration by name and ``from_config`` in small.

Built-in parts register themselves when their module is imported; a registry imports its
built-in modules on first use, so every part is available right after ``import fedgma`` without
import-order accidents (``available_aggregators()`` lists ``median`` as soon as it is called).

Adding a part: write its module, call ``AGGREGATORS.register("name", factory, Options)`` at the
bottom, and add the module to the registry's ``modules`` below (docs/ARCHITECTURE.md has an example).
"""

from __future__ import annotations

import difflib
import importlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import annotated_types
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.fields import FieldInfo

__all__ = [
    "AGGREGATORS", "BACKENDS", "CLIENT_ALGORITHMS", "DATASETS", "MODELS", "NoOptions", "Options",
    "PARTITIONERS", "Registry", "SERVER_OPTIMIZERS", "allowed_range", "describe_error", "did_you_mean", "field_at",
]

T = TypeVar("T")


class Options(BaseModel):
    """Base of every part's options model: unknown keys are errors, values are checked on assignment.

    Types are strict: ``"5"`` is not a number and ``1`` is not a boolean (a TOML integer is still
    accepted where a float is expected, and a TOML list where a tuple is).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: tuple(v) if isinstance(v, list) and k in fields and _is_tuple(fields[k].annotation) else v
                for k, v in data.items()}


def _is_tuple(annotation: Any) -> bool:
    """Whether a field's type is a tuple, or a union with one (``tuple[float, ...] | None``)."""
    if typing.get_origin(annotation) is tuple or annotation is tuple:
        return True
    return any(_is_tuple(arg) for arg in typing.get_args(annotation)) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else False


def field_at(model: type[BaseModel], loc: Sequence[Any]) -> FieldInfo | None:
    """The field of ``model`` at a validation error's location (nested models followed), or None."""
    info = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        info = model.model_fields[part]
        model = info.annotation  # type: ignore[assignment]
    return info


def allowed_range(info: FieldInfo | None) -> str:
    """A field's numeric bounds as an interval (``"(0, 1000]"``, ``"[1, ∞)"``), or ``""`` if it has none."""
    if info is None:
        return ""
    low, high = "(-∞", "∞)"
    for item in info.metadata:
        if isinstance(item, annotated_types.Gt):
            low = f"({_number(item.gt)}"
        elif isinstance(item, annotated_types.Ge):
            low = f"[{_number(item.ge)}"
        elif isinstance(item, annotated_types.Lt):
            high = f"{_number(item.lt)})"
        elif isinstance(item, annotated_types.Le):
            high = f"{_number(item.le)}]"
    return "" if (low, high) == ("(-∞", "∞)") else f"{low}, {high}"


def _number(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def describe_error(item: Mapping[str, Any], info: FieldInfo | None) -> str:
    """A pydantic error item as ``message (got value)``, with the field's allowed range for a number out of range."""
    message = str(item["msg"]).removeprefix("Value error, ")
    value = item.get("input")
    interval = allowed_range(info)
    if interval and item["type"] in _RANGE_ERRORS:
        kind = "an integer" if _is_int(info.annotation if info else None) else "a finite number"
        return f"{message}; expected {kind} in {interval} (got {value!r})"
    if isinstance(value, str) and item["type"] in ("int_type", "float_type", "bool_type"):
        message += "; write it without quotes"
    shown = "" if isinstance(value, dict) or f"{value!r}" in message else f" (got {value!r})"
    return f"{message}{shown}"


def _is_int(annotation: Any) -> bool:
    return annotation is int or int in typing.get_args(annotation)


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


class NoOptions(Options):
    """A part that takes no options."""


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    factory: Callable[..., T]
    options: type[Options]
    summary: str


class Registry(Generic[T]):
    """Named parts of one kind (``kind``, configured at config key ``key``), each with an options model."""

    def __init__(self, kind: str, key: str, modules: Sequence[str] = ()) -> None:
        self.kind, self.key = kind, key
        self._modules = tuple(modules)
        self._entries: dict[str, Entry[T]] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # set first: the modules register into this registry while importing
            for module in self._modules:
                importlib.import_module(module)

    def register(self, name: str, factory: Callable[..., T], options: type[Options] = NoOptions,
                 summary: str = "") -> None:
        """Make ``factory`` available as ``name``; it is called as ``factory(**options, **context)``.

        Raises:
            ValueError: ``name`` is already taken by another factory, or ``options`` is not an
                :class:`Options` subclass.
        """
        if not (isinstance(options, type) and issubclass(options, Options)):
            raise ValueError(f"{self.kind} {name!r}: options must be a subclass of fedgma.registry.Options")
        old = self._entries.get(name)
        if old is not None and old.factory is not factory:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = Entry(name, factory, options, summary)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def entry(self, name: str) -> Entry[T]:
        """The registration of ``name``; ValueError naming the allowed names (with a did-you-mean) if unknown."""
        self._load()
        if name not in self._entries:
            names = self.names()
            raise ValueError(f"unknown {self.kind} {name!r}{did_you_mean(name, names)}; available: {', '.join(names)}")
        return self._entries[name]

    def options(self, name: str) -> type[Options]:
        """The options model of ``name``."""
        return self.entry(name).options

    def option_names(self, name: str) -> list[str]:
        return list(self.options(name).model_fields)

    def validate(self, name: str, options: Mapping[str, Any] | None = None) -> Options:
        """``options`` checked against ``name``'s model, defaults filled in.

        Raises:
            ValueError: one line naming the part, the option and what is allowed.
        """
        entry = self.entry(name)
        options = dict(options or {})
        allowed = list(entry.options.model_fields)
        for option in options:
            if option not in allowed:
                takes = ", ".join(allowed) if allowed else "no options"
                raise ValueError(
                    f"{self.kind} {name!r} has no option {option!r}{did_you_mean(option, allowed)}; it takes: {takes}"
                )
        try:
            return entry.options.model_validate(options)
        except ValidationError as error:
            first = error.errors()[0]
            option = ".".join(str(p) for p in first["loc"])
            message = describe_error(first, field_at(entry.options, first["loc"]))
            raise ValueError(f"{self.kind} {name!r} option {option!r}: {message}") from None

    def build(self, name: str, options: Mapping[str, Any] | None = None, **context: Any) -> T:
        """Validate ``options`` and build the part; ``context`` passes what is not configuration (e.g. layers)."""
        validated = self.validate(name, options)
        return self.entry(name).factory(**validated.model_dump(), **context)


AGGREGATORS: Registry[Any] = Registry(
    "aggregator", "server.aggregator", ["fedgma.aggregation", "fedgma.robust", "fedgma.krum", "fedgma.ablations"]
)
SERVER_OPTIMIZERS: Registry[Any] = Registry("server optimizer", "server.optimizer", ["fedgma.server_opt"])
CLIENT_ALGORITHMS: Registry[Any] = Registry("client algorithm", "client.algorithm", ["fedgma.client"])
PARTITIONERS: Registry[Any] = Registry("partitioner", "data.partition", ["fedgma.data.partitioners"])
DATASETS: Registry[Any] = Registry("dataset", "data.dataset", [
    "fedgma.data.idx", "fedgma.data.cifar", "fedgma.data.digits", "fedgma.data.colored", "fedgma.data.synthetic",
    "fedgma.data.femnist", "fedgma.data.user_files"])
BACKENDS: Registry[Any] = Registry("backend", "backend", ["fedgma.backends"])
MODELS: Registry[Any] = Registry("model", "model", ["fedgma.models"])
