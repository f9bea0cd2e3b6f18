"""One typed experiment config, read from TOML and overridable with dotted ``key=value`` pairs.

Every value is validated when the config is loaded; a bad value or an unknown key raises
:class:`ConfigError` with the dotted key, what is allowed, and a did-you-mean for misspellings.
Types are strict (``rounds = "5"`` is refused; a TOML integer is accepted where a float is
expected), numbers have finite upper bounds (``MAX_RATE`` … ``MAX_SHIFT`` below: ``client.lr = 1e300``
is refused with the allowed range), and a file nested deeper than ``MAX_DEPTH`` levels is one line.

The parts a run is composed of are each configured by their own table, validated by the part
itself (:mod:`fedgma.registry`): ``[server.aggregator]``, ``[server.optimizer]``,
``[client.algorithm]``, ``[data.dataset]``, ``[data.partition]`` and ``[backend]``, each with a
``name`` and that part's options; a bare string (``server.aggregator = "gma"``) picks a part with its
defaults. An option the chosen part does not take is an error naming the part and what it takes.

``algorithm`` names a recipe (:mod:`fedgma.algorithms`): defaults for the client algorithm, the
server optimizer and local training, filled in by :func:`resolve` wherever the user left them
unset. The run folder stores the resolved config, so it shows every value used.

Configs of the earlier flat shape (``server.threshold``, ``server.lr``, ``data.alpha``,
``[data.options]``, ``workers``, ...) are upgraded by :func:`upgrade_raw`, so old configs and run
folders keep working; a flat key the chosen part does not use is an error naming its new key.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import tomli_w
import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fedgma.algorithms import RECIPES, available_algorithms
from fedgma.models import available_models
from fedgma.registry import (
    AGGREGATORS,
    BACKENDS,
    CLIENT_ALGORITHMS,
    DATASETS,
    PARTITIONERS,
    SERVER_OPTIMIZERS,
    Registry,
    describe_error,
    did_you_mean,
    field_at,
)

__all__ = [
    "Config", "ConfigError", "Part", "apply_overrides", "config_to_toml", "key_hyperparameters",
    "load_config", "parse_config", "resolve", "set_key", "upgrade_raw",
]


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


# Upper bounds of values that are finite but absurd (they would overflow, hang or allocate without limit later).
MAX_RATE = 1e3  # client.lr, client.weight_decay, client.prox_mu (server optimizers' lr and eps: the same bound)
MAX_LOCAL_EPOCHS = 10_000  # client.local_epochs
MAX_LOCAL_STEPS = 10_000_000  # client.local_steps
MAX_THREADS = 1024  # threads
MAX_NOISE = 100.0  # a noise domain's σ (inputs are scaled to about [0, 1])
MAX_CONTRAST = 1e3  # a contrast domain's factor
MAX_SHIFT = 1e3  # a brightness domain's offset, and each tint component's magnitude
MAX_DEPTH = 16  # nesting of tables and lists in a config file (the deepest valid config has 5)

#: Other names of data sets, resolved to the registered (canonical) name.
DATASET_ALIASES = {"fmnist": "fashion-mnist", "fashion_mnist": "fashion-mnist"}


class _Section(BaseModel):
    # strict: "5" is not a number and 1 is not a boolean; a TOML integer is still accepted where a float is expected
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class Part(BaseModel):
    """One configured part: its registered ``name`` and its options (the table's other keys).

    Written ``key = "name"`` (the part with its defaults) or as a table ``[key]`` with ``name`` and
    options. ``name`` may be left out only where a recipe supplies it (server optimizer, client
    algorithm). The options are checked by the part's own model in the registry.
    """

    model_config = ConfigDict(extra="allow")

    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @property
    def options(self) -> dict[str, Any]:
        """The part's options (every key of its table but ``name``)."""
        return dict(self.model_extra or {})


def _part_names(registry: Registry[Any]) -> list[str]:
    return registry.names()


def _option_names(registry: Registry[Any], name: str) -> list[str]:
    """The options ``name`` takes."""
    return registry.option_names(name)


def _validate_part(registry: Registry[Any], part: Part | None, fill: bool = False) -> Part | None:
    """Check ``part`` against its registry; with ``fill``, return it with every default filled in."""
    if part is None or part.name is None:
        return part
    validated = registry.validate(part.name, part.options)
    return Part(name=part.name, **validated.model_dump(exclude_none=True)) if fill else part


def _part_validator(registry: Registry[Any]) -> Any:
    def check(value: Part | None) -> Part | None:
        return _validate_part(registry, value)

    return check


class DomainsConfig(_Section):
    """Feature skew (``[data.domains]``): per-client input domains and held-out test domains.

    ``kind`` says what a plain value in ``train`` / ``test`` means: an angle (rotation), a noise σ
    (noise), a contrast factor, a brightness offset, or an [r, g, b] tint; any entry may instead be
    a table of :class:`fedgma.data.domains.Domain` fields (``custom`` takes only tables). ``sigma``
    gives NIID-Bench's noise skew: client i of N gets noise σ·i/N. See docs/HETEROGENEITY.md.
    """

    kind: Literal["none", "rotation", "noise", "contrast", "brightness", "tint", "custom"] = "none"
    train: list[Any] = Field(default_factory=list)  # one domain per entry, dealt to clients by `assignment`
    test: list[Any] = Field(default_factory=list)  # held-out test domains: metrics ood/<name>_accuracy
    assignment: Literal["contiguous", "round_robin", "random"] = "contiguous"
    sigma: float | None = Field(None, ge=0, le=MAX_NOISE, allow_inf_nan=False)  # noise only: client i of N gets σ·i/N

    @model_validator(mode="after")
    def _valid_domains(self) -> DomainsConfig:
        from fedgma.data.federated import make_domains

        if self.kind == "none":
            if self.train or self.test or self.sigma is not None:
                raise ValueError("set kind (rotation, noise, contrast, brightness, tint, custom) to use domains")
            return self
        if self.sigma is not None and (self.kind != "noise" or self.train):
            raise ValueError("sigma (NIID-Bench per-client noise σ·i/N) needs kind = 'noise' and no train list")
        if self.sigma is None and not self.train:
            raise ValueError(f"kind {self.kind!r} needs a list of training domains, e.g. train = [0, 15, 30, 45]")
        for key, values in (("data.domains.train", self.train), ("data.domains.test", self.test)):
            for i, domain in enumerate(make_domains(self.kind, values, key)):
                _check_domain_range(domain, f"{key}[{i}]")
        names = [d.name for d in make_domains(self.kind, self.test, "data.domains.test")]
        if len(set(names)) != len(names):
            raise ValueError(f"held-out test domains need distinct names, got {names}")
        return self


class DataConfig(_Section):
    dataset: Part = Field(default_factory=lambda: Part(name="fashion-mnist"))  # [data.dataset]: loader + options
    data_dir: str | None = None
    download: bool = False
    partition: Part = Field(default_factory=lambda: Part(name="dirichlet"))  # [data.partition]: partitioner + options
    num_clients: int = Field(100, ge=1)  # clients that train
    holdout_clients: int = Field(0, ge=0)  # further clients of the same partition used only for testing
    train_subset: int | None = Field(None, ge=1)  # keep a fixed random subset of the training records
    test_subset: int | None = Field(None, ge=1)  # … and of the test records
    domains: DomainsConfig = Field(default_factory=DomainsConfig)
    # fraction of every client's training records held out as one validation set (for tuning; 0: none)
    validation_fraction: float = Field(0.0, ge=0, lt=1)

    @field_validator("dataset", mode="before")
    @classmethod
    def _alias(cls, value: Any) -> Any:
        if isinstance(value, str):
            return DATASET_ALIASES.get(value, value)
        if isinstance(value, dict) and value.get("name") in DATASET_ALIASES:
            return {**value, "name": DATASET_ALIASES[value["name"]]}
        if isinstance(value, Part) and value.name in DATASET_ALIASES:
            return Part(name=DATASET_ALIASES[value.name], **value.options)
        return value

    _dataset = field_validator("dataset")(_part_validator(DATASETS))
    _partition = field_validator("partition")(_part_validator(PARTITIONERS))

    @field_validator("dataset", "partition")
    @classmethod
    def _named(cls, value: Part, info: ValidationInfo) -> Part:
        if value.name is None:
            raise ValueError(f"data.{info.field_name} needs a name")
        return value


class ModelConfig(_Section):
    name: str = "mlp"

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _one_of(value, available_models())


class ClientConfig(_Section):
    algorithm: Part | None = None  # [client.algorithm]: sgd | scaffold (default: the recipe's)
    local_epochs: int = Field(1, ge=1, le=MAX_LOCAL_EPOCHS)
    local_steps: int | None = Field(None, ge=1, le=MAX_LOCAL_STEPS)
    batch_size: int = Field(32, ge=1, le=2**31)
    lr: float = Field(0.01, gt=0, le=MAX_RATE, allow_inf_nan=False)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE, allow_inf_nan=False)
    prox_mu: float | None = Field(None, ge=0, le=MAX_RATE, allow_inf_nan=False)

    _algorithm = field_validator("algorithm")(_part_validator(CLIENT_ALGORITHMS))


class ServerConfig(_Section):
    aggregator: Part = Field(default_factory=lambda: Part(name="gma"))  # [server.aggregator]: rule + options
    optimizer: Part | None = None  # [server.optimizer]: sgd | adam | yogi | adagrad + options (default: recipe's)
    clients_per_round: int = Field(10, ge=1)
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_update_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    on_bad_update: Literal["fail", "drop"] = "fail"
    min_clients: int = Field(1, ge=1)
    secure_aggregation: bool = False  # engine = "flower" only: rounds through Flower's SecAgg+ (docs/PRIVACY.md)

    _aggregator = field_validator("aggregator")(_part_validator(AGGREGATORS))
    _optimizer = field_validator("optimizer")(_part_validator(SERVER_OPTIMIZERS))

    @field_validator("aggregator")
    @classmethod
    def _named(cls, value: Part) -> Part:
        if value.name is None:
            raise ValueError("server.aggregator needs a name")
        return value


class FaultsConfig(_Section):
    """Simulated client faults and attacks (see :mod:`fedgma.faults`); all off by default.

    ``crash`` … ``scale`` are fractions of each round's sampled clients; ``label_flip`` is the
    fraction of the client population whose training labels are flipped for the whole run.
    """

    crash: float = Field(0.0, ge=0, le=1)
    straggle: float = Field(0.0, ge=0, le=1)
    nan: float = Field(0.0, ge=0, le=1)
    sign_flip: float = Field(0.0, ge=0, le=1)
    scale: float = Field(0.0, ge=0, le=1)
    scale_factor: float = Field(10.0, ge=-1e6, le=1e6, allow_inf_nan=False)
    label_flip: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _fractions_fit(self) -> FaultsConfig:
        total = self.crash + self.straggle + self.nan + self.sign_flip + self.scale
        if total > 1:
            raise ValueError(
                f"crash + straggle + nan + sign_flip + scale must be ≤ 1 (one fault per client), got {total:g}"
            )
        return self


class Config(_Section):
    name: str | None = None
    seed: int = Field(0, ge=0)
    rounds: int = Field(50, ge=1)
    eval_every: int = Field(5, ge=1)
    algorithm: str = "fedavg"
    device: str = "cpu"
    backend: Part = Field(default_factory=lambda: Part(name="sequential"))  # [backend]: how clients are trained
    engine: Literal["fedgma", "flower"] = "fedgma"  # flower: Flower's simulation engine (fedgma[flower])
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    checkpoint_every: int = Field(1, ge=0)  # rounds between checkpoints; 0: never
    tensorboard: bool = False  # every metric to <run>/tensorboard too (pip install 'fedgma[tensorboard]')
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        return _one_of(value, available_algorithms())

    _backend = field_validator("backend")(_part_validator(BACKENDS))

    @model_validator(mode="after")
    def _secure_on_flower(self) -> Config:
        if self.server.secure_aggregation and self.engine != "flower":
            raise ValueError('server.secure_aggregation = true runs on Flower\'s SecAgg+: it needs engine = "flower" '
                             "(--engine flower)")
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda") and value != "mps":
            raise ValueError(f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
        return value


def _check_domain_range(domain: Any, where: str) -> None:
    """Refuse a feature-skew domain whose noise, contrast, brightness or tint is finite but absurd."""
    bounds = [("noise σ", domain.noise, 0.0, MAX_NOISE), ("contrast", domain.contrast, 0.0, MAX_CONTRAST),
              ("brightness", domain.brightness, -MAX_SHIFT, MAX_SHIFT)]
    bounds += [("tint component", t, -MAX_SHIFT, MAX_SHIFT) for t in domain.tint or ()]
    for name, value, low, high in bounds:
        if not low <= value <= high:
            raise ValueError(f"{where}: {name} must lie in [{low:g}, {high:g}], got {value:g}")


def _one_of(value: str, allowed: list[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}{_did_you_mean(value, allowed)}")
    return value


_did_you_mean = did_you_mean


# --------------------------------------------------------------------------------------------
# Loading, overriding, resolving, saving
# --------------------------------------------------------------------------------------------


#: Part tables by dotted key, with their registries.
PART_KEYS: dict[str, Registry[Any]] = {
    "server.aggregator": AGGREGATORS,
    "server.optimizer": SERVER_OPTIMIZERS,
    "client.algorithm": CLIENT_ALGORITHMS,
    "data.dataset": DATASETS,
    "data.partition": PARTITIONERS,
    "backend": BACKENDS,
}


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation is not Part:
            keys += _known_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


# --------------------------------------------------------------------------------------------
# The earlier flat shape
# --------------------------------------------------------------------------------------------

#: old flat key -> (its part table, the option's name there, the value the old code wrote by default)
_MOVED: dict[str, tuple[str, str, Any]] = {
    "server.threshold": ("server.aggregator", "threshold", 0.4),
    "server.hard": ("server.aggregator", "hard", False),
    "server.weighted_agreement": ("server.aggregator", "weighted_agreement", False),
    "server.trim_fraction": ("server.aggregator", "trim_fraction", 0.1),
    "server.lr": ("server.optimizer", "lr", None),
    "server.momentum": ("server.optimizer", "momentum", 0.0),
    "server.beta1": ("server.optimizer", "beta1", 0.9),
    "server.beta2": ("server.optimizer", "beta2", 0.99),
    "server.eps": ("server.optimizer", "eps", 1e-3),
    "data.alpha": ("data.partition", "alpha", 0.5),
    "data.classes_per_client": ("data.partition", "classes_per_client", 2),
    "data.beta": ("data.partition", "beta", None),
    "data.sigma": ("data.partition", "sigma", None),
    "data.min_size": ("data.partition", "min_size", 10),
    "workers": ("backend", "workers", None),
    "vector_clients": ("backend", "max_clients", None),
    "scaffold_memory_mb": ("client.algorithm", "memory_mb", 1024),
}
_DEFAULT_PART = {"server.aggregator": "gma", "data.partition": "dirichlet", "data.dataset": "fashion-mnist",
                 "backend": "sequential"}


def _table(raw: dict[str, Any], dotted: str) -> dict[str, Any]:
    node = raw
    for part in dotted.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _part_table(raw: dict[str, Any], dotted: str) -> dict[str, Any]:
    """The part at ``dotted`` as a table (a bare name becomes ``{"name": ...}``), created in ``raw``."""
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {part!r} must be a table (section), got {node!r}")
    value = node.get(leaf)
    if isinstance(value, str) or value is None:
        node[leaf] = {} if value is None else {"name": value}
    elif not isinstance(value, dict):
        raise ConfigError(f"config key {dotted!r} must be a part's name or a table of name and options, got {value!r}")
    return node[leaf]


def _part_name(raw: dict[str, Any], dotted: str) -> str | None:
    value = _table(raw, dotted.rsplit(".", 1)[0]).get(dotted.rsplit(".", 1)[-1]) if "." in dotted else raw.get(dotted)
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"]
    recipe = RECIPES.get(str(raw.get("algorithm", "fedavg")))
    if dotted == "server.optimizer" and recipe is not None:
        return recipe.server_optimizer
    if dotted == "client.algorithm" and recipe is not None:
        return recipe.client_algorithm
    return _DEFAULT_PART.get(dotted)


def upgrade_raw(raw: dict[str, Any]) -> dict[str, Any]:
    """A raw config dict of the earlier flat shape rewritten into per-part tables (in place; returned).

    ``server.threshold`` → ``server.aggregator.threshold``, ``server.lr`` → ``server.optimizer.lr``,
    ``data.alpha`` → ``data.partition.alpha``, ``[data.options]`` → ``[data.dataset]``, ``workers`` →
    ``backend.workers``, ``scaffold_memory_mb`` → ``client.algorithm.memory_mb``, and so on. A flat key
    the chosen part does not take is dropped where it holds the value the old code wrote by default
    (old run folders hold every key), and is otherwise an error naming its new key.

    Raises:
        ConfigError: a flat key with a non-default value that the chosen part does not take.
    """
    if not isinstance(raw, dict):
        return raw
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("options"), dict):
        options = data.pop("options")
        if options:
            _part_table(raw, "data.dataset").update(options)
    for old, (target, option, default) in _MOVED.items():
        section, _, leaf = old.rpartition(".")
        holder = _table(raw, section) if section else raw
        if leaf not in holder or (section == "" and old == "backend"):
            continue
        value = holder.pop(leaf)
        name = _part_name(raw, target)
        registry = PART_KEYS[target]
        known = name is not None and name in _part_names(registry)
        if not known or option in _option_names(registry, name):  # an unknown part is reported by its own check
            table = _part_table(raw, target)
            if target not in ("server.optimizer", "client.algorithm"):  # those two may take the recipe's name
                table.setdefault("name", name)
            table[option] = value
        elif value != default:
            raise ConfigError(
                f"config key {old!r} is now '{target}.{option}', and {registry.kind} {name!r} does not take "
                f"{option!r}; remove it, or pick another {registry.kind} that takes it"
            )
    return raw


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(_unknown_key(tuple(str(part) for part in item["loc"])))
            continue
        if not key:  # a check across sections (Config's own validators): its message names the keys
            lines.append(f"config: {describe_error(item, None)}")
            continue
        lines.append(f"config key {key!r}: {describe_error(item, field_at(Config, item['loc']))}")
    return "; ".join(lines)


def _unknown_key(loc: tuple[str, ...]) -> str:
    """'unknown config key' with a did-you-mean (in its section, else anywhere) and the section's keys."""
    key = ".".join(loc)
    section: type[BaseModel] = Config
    depth = 0
    for part in loc[:-1]:
        annotation = section.model_fields[part].annotation if part in section.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        section = annotation
        depth += 1
    prefix = ".".join(loc[:depth])
    siblings = [f"{prefix}.{name}" if prefix else name for name in section.model_fields]
    known = _known_keys(Config)
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == loc[-1] and k != key]
    in_known_section = depth == len(loc) - 1
    hint = (_did_you_mean(key, siblings) or _did_you_mean(key, known)) if in_known_section else (
        _did_you_mean(key, known) or _did_you_mean(key, siblings)
    )
    if not hint and same_leaf:
        hint = f" (did you mean {' or '.join(repr(k) for k in same_leaf)}?)"
    where = f"[{prefix}]" if prefix else "the top level"
    return f"unknown config key {key!r}{hint}; {where} takes: {', '.join(section.model_fields)}"


def _check_depth(raw: Any) -> None:
    """Refuse a raw config nested deeper than ``MAX_DEPTH`` (checked without recursion, so any depth is safe)."""
    stack: list[tuple[Any, int, str]] = [(raw, 0, "")]
    while stack:
        node, depth, key = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(f"config key {key[:60]!r}…: tables or lists nest more than {MAX_DEPTH} levels deep; "
                              "no config key is that deep")
        if isinstance(node, dict):
            stack += [(v, depth + 1, f"{key}.{k}" if key else str(k)) for k, v in node.items()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, depth + 1, f"{key}[{i}]") for i, v in enumerate(node)]


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate a raw nested dict into a :class:`Config` (not yet resolved); the flat shape is upgraded first.

    Raises:
        ConfigError: one line naming the first bad key (unknown, wrong type, out of range, nested too deeply).
    """
    _check_depth(raw)
    raw = upgrade_raw(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def parse_value(text: str) -> Any:
    """A command-line value: a TOML scalar (number, boolean, quoted string) or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text  # a bare string, e.g. server.aggregator=mean


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as TOML, else taken as strings) to a raw dict.

    Values keep their TOML type: ``rounds=5`` is an integer, ``rounds='5'`` a string (refused where a
    number is expected).

    ``server.aggregator.threshold=0.2`` sets one option of a part; ``server.aggregator=mean`` picks
    a part: its options are kept when the name stays the same and reset to the part's defaults when
    it changes. Flat keys of the earlier shape (``server.threshold=0.2``) are upgraded.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. server.aggregator=mean")
        key, text = item.split("=", 1)
        set_key(raw, key.strip(), parse_value(text.strip()))
    return raw


def set_key(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set the dotted ``key`` of a raw config dict to ``value`` (see :func:`apply_overrides`); returns ``raw``.

    Raises:
        ConfigError: an unknown key (with did-you-mean), or a key below something that is not a table.
    """
    part_key = next((p for p in PART_KEYS if key.startswith(p + ".")), None)
    if key == "algorithm" and isinstance(value, str) and value != raw.get("algorithm", "fedavg"):
        _forget_other_recipes_options(upgrade_raw(raw), value)
    if key in PART_KEYS and isinstance(value, str):
        table = _part_table(upgrade_raw(raw), key)
        if table.get("name") != value:
            table.clear()
            table["name"] = value
        return raw
    if part_key is not None:  # an option of a part, checked by the part when the config is parsed
        table = _part_table(upgrade_raw(raw), part_key)
        if part_key in _DEFAULT_PART:  # the default part, named, so that its option is checked against it
            table.setdefault("name", _part_name(raw, part_key))
        table[key[len(part_key) + 1:]] = value
        return raw
    if key not in _known_keys(Config) and key not in _MOVED and not key.startswith("data.options."):
        raise ConfigError(_unknown_key(tuple(key.split("."))))
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {part!r} must be a table (section), got {node!r}")
    node[leaf] = value
    return upgrade_raw(raw)


def _forget_other_recipes_options(raw: dict[str, Any], algorithm: str) -> None:
    """Drop server optimizer options set (without an optimizer name) for the algorithm being replaced.

    They were meant for the old recipe's optimizer: ``server.lr = 1.0`` for FedAvg must not run FedAdam
    at server lr 1 after ``--set algorithm=fedadam``, so the new recipe's defaults apply instead. An
    optimizer the user named keeps its options; options set after the algorithm apply to the new one.
    """
    server = raw.get("server")
    table = server.get("optimizer") if isinstance(server, dict) else None
    if isinstance(table, dict) and "name" not in table and table:
        log.warning("server.optimizer options %s were set for algorithm %r, not %r; the defaults of %r apply "
                    "(set server.optimizer.* after algorithm= to change them)",
                    dict(table), raw.get("algorithm", "fedavg"), algorithm, algorithm)
        del server["optimizer"]


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or start from defaults when ``path`` is None), apply overrides, resolve."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        except RecursionError:  # tomllib recurses once per level of nested inline tables and arrays
            raise ConfigError(f"config file {path} nests tables or lists too deeply (at most {MAX_DEPTH} levels)") \
                from None
        raw.setdefault("name", path.stem)
    return resolve(parse_config(apply_overrides(raw, overrides or [])))


def resolve(config: Config) -> Config:
    """Fill every unset value from the algorithm's recipe and each part's own defaults; check cross-field rules.

    The server optimizer and client algorithm default to the recipe's. Where the user names the
    recipe's own optimizer (or none), the recipe's options (e.g. FedAdam's server lr 0.01) fill what
    the user left unset; another optimizer starts from its own defaults.
    """
    recipe = RECIPES[config.algorithm]
    resolved = config.model_copy(deep=True)
    for field, value in recipe.client_defaults.items():
        if getattr(resolved.client, field) is None:
            setattr(resolved.client, field, value)
    optimizer = resolved.server.optimizer or Part()
    if optimizer.name in (None, recipe.server_optimizer):
        optimizer = Part(name=recipe.server_optimizer, **{**recipe.server_options, **optimizer.options})
    algorithm = resolved.client.algorithm or Part()
    if algorithm.name is None:
        algorithm = Part(name=recipe.client_algorithm, **algorithm.options)
    parts = {
        "server.optimizer": optimizer, "client.algorithm": algorithm, "server.aggregator": resolved.server.aggregator,
        "data.partition": resolved.data.partition, "data.dataset": resolved.data.dataset, "backend": resolved.backend,
    }
    for key, part in parts.items():
        try:
            filled = _validate_part(PART_KEYS[key], part, fill=True)
        except ValueError as error:
            raise ConfigError(f"config key {key!r}: {error}") from None
        section, _, field = key.rpartition(".")
        setattr(getattr(resolved, section) if section else resolved, field, filled)
    if resolved.client.algorithm.name == "scaffold" and (resolved.client.momentum or resolved.client.prox_mu):
        raise ConfigError(
            "config key 'client.momentum'/'client.prox_mu': scaffold needs plain local SGD (set both to 0)"
        )
    if resolved.server.clients_per_round > resolved.data.num_clients:
        raise ConfigError(
            f"config key 'server.clients_per_round': {resolved.server.clients_per_round} exceeds "
            f"data.num_clients = {resolved.data.num_clients}"
        )
    if resolved.server.min_clients > resolved.server.clients_per_round:
        raise ConfigError(
            f"config key 'server.min_clients': {resolved.server.min_clients} exceeds "
            f"server.clients_per_round = {resolved.server.clients_per_round}"
        )
    return resolved


def config_to_dict(config: Config) -> dict[str, Any]:
    return config.model_dump(exclude_none=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"server": {"lr": 1}}`` → ``{"server.lr": 1}``: a nested config dict by dotted key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_to_toml(config: Config) -> str:
    """The config as TOML (unset optional values are omitted, since TOML has no null)."""
    return tomli_w.dumps(config_to_dict(config))


def key_hyperparameters(config: Config) -> str:
    """One line with the hyper-parameters that decide a run, as resolved (for ``fedgma run`` to print at start).

    E.g. ``fedavg: client sgd lr 0.01 × 1 local epoch(s), batch 32 | aggregator gma τ=0.4 | server sgd lr 1 |
    10 of 100 clients per round``. Pass a resolved config (:func:`load_config` / :func:`resolve`).
    """
    client = config.client
    algorithm = config.client.algorithm.name if config.client.algorithm else RECIPES[config.algorithm].client_algorithm
    local = f"{client.local_steps} local steps" if client.local_steps else f"{client.local_epochs} local epoch(s)"
    extras = [f"{k} {getattr(client, k):g}" for k in ("momentum", "weight_decay", "prox_mu") if getattr(client, k)]
    aggregator = config.server.aggregator
    options = aggregator.options
    agg = [f"τ={options.pop('threshold'):g}"] if "threshold" in options else []
    agg += [k if v is True else f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in options.items() if v is not False and v is not None]
    optimizer = config.server.optimizer or Part(name=RECIPES[config.algorithm].server_optimizer)
    server = [f"{k} {v:g}" for k, v in optimizer.options.items() if k in ("lr", "momentum") and v]
    return " | ".join([
        f"{config.algorithm}: client {algorithm} lr {client.lr:g} × {local}, batch {client.batch_size}"
        + "".join(f", {e}" for e in extras),
        " ".join([f"aggregator {aggregator.name}", *agg]),
        " ".join([f"server {optimizer.name}", *server]),
        f"{config.server.clients_per_round} of {config.data.num_clients} clients per round",
    ])
