"""One typed experiment config, read from TOML and overridable with dotted ``key=value`` pairs.

Every value is validated when the config is loaded; a bad value or an unknown key raises
:class:`ConfigError` with the dotted key, what is allowed, and a did-you-mean for misspellings.
Fields left unset (``None``) take the defaults of the chosen algorithm's recipe in
:func:`resolve`, and the run folder stores the resolved config, so it shows every value used.
"""

from __future__ import annotations

import difflib
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

import fedgma.robust  # noqa: F401  (registers the robust aggregators: median, trimmed_mean)
from fedgma.aggregation import available_aggregators
from fedgma.algorithms import RECIPES, available_algorithms
from fedgma.models import available_models

__all__ = ["Config", "ConfigError", "apply_overrides", "config_to_toml", "load_config", "parse_config", "resolve"]


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    sigma: float | None = Field(None, ge=0, allow_inf_nan=False)  # noise only: client i of N gets σ·i/N

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
        make_domains(self.kind, self.train, "data.domains.train")
        names = [d.name for d in make_domains(self.kind, self.test, "data.domains.test")]
        if len(set(names)) != len(names):
            raise ValueError(f"held-out test domains need distinct names, got {names}")
        return self


class DataConfig(_Section):
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    download: bool = False
    options: dict[str, Any] = Field(default_factory=dict)  # [data.options]: passed to the dataset's loader
    partition: str = "dirichlet"  # iid | dirichlet | shards | quantity | quantity-label | natural
    alpha: float = Field(0.5, gt=0)  # Dirichlet label skew (dirichlet, quantity-label)
    classes_per_client: int = Field(2, ge=1)  # shards: classes per client (NIID-Bench #label k)
    beta: float | None = Field(None, gt=0, allow_inf_nan=False)  # quantity skew: Dirichlet(β) client shares
    sigma: float | None = Field(None, gt=0, allow_inf_nan=False)  # quantity skew: log-normal(0, σ) sizes
    num_clients: int = Field(100, ge=1)  # clients that train
    holdout_clients: int = Field(0, ge=0)  # further clients of the same partition used only for testing
    min_size: int = Field(10, ge=0)
    train_subset: int | None = Field(None, ge=1)  # keep a fixed random subset of the training records
    test_subset: int | None = Field(None, ge=1)  # … and of the test records
    domains: DomainsConfig = Field(default_factory=DomainsConfig)
    # fraction of every client's training records held out as one validation set (for tuning; 0: none)
    validation_fraction: float = Field(0.0, ge=0, lt=1)

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from fedgma.data.datasets import available_datasets

        return _one_of(value, available_datasets())

    @field_validator("partition")
    @classmethod
    def _known_partition(cls, value: str) -> str:
        from fedgma.data.federated import available_partitions

        return _one_of(value, available_partitions())

    @field_validator("options")
    @classmethod
    def _loader_takes_options(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        from fedgma.data.datasets import check_options

        if "dataset" in info.data:
            check_options(info.data["dataset"], value)
        return value

    @model_validator(mode="after")
    def _quantity_skew(self) -> DataConfig:
        if self.partition in ("quantity", "quantity-label") and (self.beta is None) == (self.sigma is None):
            raise ValueError(
                f"partition {self.partition!r} needs exactly one of data.beta (Dirichlet(β) client shares, "
                "NIID-Bench) or data.sigma (log-normal(0, σ) client sizes)"
            )
        return self


class ModelConfig(_Section):
    name: str = "mlp"

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        return _one_of(value, available_models())


class ClientConfig(_Section):
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    prox_mu: float | None = Field(None, ge=0)


class ServerConfig(_Section):
    aggregator: str = "gma"
    threshold: float = Field(0.4, ge=0, le=1)
    hard: bool = False
    weighted_agreement: bool = False
    lr: float | None = Field(None, gt=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    eps: float = Field(1e-3, gt=0)
    clients_per_round: int = Field(10, ge=1)
    trim_fraction: float = Field(0.1, ge=0, lt=0.5)
    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_update_norm: float | None = Field(None, gt=0, allow_inf_nan=False)
    on_bad_update: Literal["fail", "drop"] = "fail"
    min_clients: int = Field(1, ge=1)

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, value: str) -> str:
        return _one_of(value, available_aggregators())


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
    scale_factor: float = Field(10.0, allow_inf_nan=False)
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
    backend: str = "sequential"
    engine: Literal["fedgma", "flower"] = "fedgma"  # flower: Flower's simulation engine (fedgma[flower])
    threads: int | None = Field(None, ge=1)
    workers: int | None = Field(None, ge=1)  # backend "multiprocess": worker processes (default: every core)
    vector_clients: int | None = Field(None, ge=1)  # backend "vectorized": clients per batched group (default: all)
    scaffold_memory_mb: int | None = Field(1024, ge=0)  # SCAFFOLD c_i kept in RAM up to this, then on disk; None: RAM
    checkpoint_every: int = Field(1, ge=0)  # rounds between checkpoints; 0: never
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        return _one_of(value, available_algorithms())

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        from fedgma.backends import available_backends

        return _one_of(value, available_backends())

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value != "cpu" and not value.startswith("cuda") and value != "mps":
            raise ValueError(f"must be 'cpu', 'cuda', 'cuda:N' or 'mps', got {value!r}")
        return value


def _one_of(value: str, allowed: list[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}{_did_you_mean(value, allowed)}")
    return value


def _did_you_mean(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(str(word), candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------------------------
# Loading, overriding, resolving, saving
# --------------------------------------------------------------------------------------------


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _format_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(_unknown_key(tuple(str(part) for part in item["loc"])))
            continue
        message = item["msg"].removeprefix("Value error, ")
        value = item.get("input")
        shown = "" if isinstance(value, dict) or f"{value!r}" in message else f" (got {value!r})"
        lines.append(f"config key {key!r}: {message}{shown}")
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


def parse_config(raw: dict[str, Any]) -> Config:
    """Validate a raw nested dict into a :class:`Config` (not yet resolved)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(error)) from None


def parse_value(text: str) -> Any:
    """A command-line value: a TOML scalar (number, boolean, quoted string) or else the bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare string, e.g. server.aggregator=mean


_FREE_TABLES = ("data.options.",)  # tables whose keys belong to someone else (the dataset's loader)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as TOML, else taken as strings) to a raw dict."""
    known = _known_keys(Config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. server.aggregator=mean")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in known and not key.startswith(_FREE_TABLES):  # e.g. data.options.alpha=0.5
            raise ConfigError(_unknown_key(tuple(key.split("."))))
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key {part!r} must be a table (section), got {node!r}")
        node[leaf] = parse_value(text.strip())
    return raw


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
        raw.setdefault("name", path.stem)
    return resolve(parse_config(apply_overrides(raw, overrides or [])))


def resolve(config: Config) -> Config:
    """Fill every unset value from the algorithm's recipe and check cross-field constraints."""
    resolved = config.model_copy(deep=True)
    for key, value in RECIPES[config.algorithm].defaults.items():
        section, field = key.split(".")
        target = getattr(resolved, section)
        if getattr(target, field) is None:
            setattr(target, field, value)
    if resolved.algorithm == "scaffold" and (resolved.client.momentum or resolved.client.prox_mu):
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
