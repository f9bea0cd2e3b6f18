"""The Flower app's configuration: a Flower run config as a fedgma experiment, and what both sides build from it.

:func:`config_from_run_config` turns the app's run config ([tool.flwr.app.config], ``--run-config``)
into a resolved :class:`fedgma.config.Config` and the app's own keys; :func:`check_supported` and,
for ``secure-aggregation = true``, :class:`SecureSettings` / :func:`secure_settings` /
:func:`check_secure_supported` refuse what the Flower engine cannot run; :func:`build_data` and
:func:`build_flat_model` are the federated data set and the model that the ServerApp
(:mod:`fedgma.flower.server_app`) and each ClientApp (:mod:`fedgma.flower.client_app`) build from
the same config. ``EXPERIMENT_KEY`` and ``PARTITION_KEY`` are the keys that carry the experiment
config in messages and a node's partition in its node config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import tomllib

from fedgma.config import Config, ConfigError, parse_config, resolve, set_key
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.models import FlatModel, build_model
from fedgma.seeding import torch_generator

__all__ = [
    "EXPERIMENT_KEY",
    "PARTITION_KEY",
    "SECURE_AGGREGATORS",
    "SecureSettings",
    "build_data",
    "build_flat_model",
    "check_secure_supported",
    "check_supported",
    "config_from_run_config",
    "secure_settings",
]

EXPERIMENT_KEY = "fedgma-config"  # ConfigRecord key: the resolved experiment config as TOML
PARTITION_KEY = "partition-id"


def check_supported(config: Config) -> None:
    """Raise ConfigError for what the Flower engine does not (yet) run."""
    if config.client.algorithm.name not in ("sgd", "scaffold"):
        raise ConfigError(f"config key 'client.algorithm': {config.client.algorithm.name!r} is not supported by "
                          "--engine flower (sgd and scaffold are)")
    faults = getattr(config, "faults", None)
    if faults is not None and any(v for k, v in faults.model_dump().items() if k != "scale_factor"):
        raise ConfigError("config section [faults] (simulated faults) is not supported by --engine flower")


SECURE_AGGREGATORS = ("gma", "mean")


@dataclass(frozen=True)
class SecureSettings:
    """The app's ``secure-*`` run-config keys: GMA through Flower's SecAgg+ (:mod:`fedgma.flower.secure`).

    ``update_bound`` (``secure-update-bound``) is B, each client's update is clipped to ±B per
    coordinate before encoding; ``num_shares`` and ``reconstruction_threshold``
    (``secure-num-shares``, ``secure-reconstruction-threshold``) are ``SecAggPlusWorkflow``'s: an integer
    is a number of clients, a float in (0, 1] a fraction of the round's sampled clients.

    Raises:
        ConfigError: a value out of range, naming its run-config key.
    """

    update_bound: float = 1.0
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.6

    def __post_init__(self) -> None:
        bound = self.update_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (0 < bound < math.inf):
            raise ConfigError(f"run-config key 'secure-update-bound': expected a finite number > 0, got {bound!r}")
        # Flower's SecAggPlusWorkflow: an integer num_shares must be > 2, an integer threshold ≥ 2 (1 means 1.0)
        for key, value, least in (("secure-num-shares", self.num_shares, 3),
                                  ("secure-reconstruction-threshold", self.reconstruction_threshold, 2)):
            ok = (isinstance(value, int) and not isinstance(value, bool) and value >= least) or (
                isinstance(value, float) and 0 < value <= 1)
            if not ok:
                raise ConfigError(f"run-config key {key!r}: expected an integer ≥ {least} (clients) or a float in "
                                  f"(0, 1] (a fraction of the round's clients), got {value!r}")
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and isinstance(threshold, int) and threshold >= shares:
            raise ConfigError(f"run-config key 'secure-reconstruction-threshold': expected fewer than "
                              f"secure-num-shares = {shares} shares, got {threshold}")

    def check_clients_per_round(self, clients_per_round: int) -> None:
        """Refuse (ConfigError, one line) integer settings that no round of ``clients_per_round`` clients can
        meet: SecAgg+ would halt every round ("Insufficient available nodes") and the run would train nothing.
        """
        shares = self.num_shares
        if isinstance(shares, int) and shares > clients_per_round:
            raise ConfigError(f"run-config key 'secure-num-shares': {shares} shares but server.clients_per_round = "
                              f"{clients_per_round}; expected at most the round's clients (or a float fraction)")
        threshold = self.reconstruction_threshold
        if isinstance(threshold, int):
            effective = shares if isinstance(shares, int) else _flower_num_shares(shares, clients_per_round)
            if threshold > effective:
                raise ConfigError(f"run-config key 'secure-reconstruction-threshold': {threshold} shares needed but "
                                  f"a round of {clients_per_round} clients shares each secret {effective} times "
                                  f"(secure-num-shares = {shares}); SecAgg+ would halt every round")


def _flower_num_shares(fraction: float, num_clients: int) -> int:
    """The number of shares SecAggPlusWorkflow's setup stage uses for a float ``num_shares`` (flwr 1.41)."""
    shares = round(fraction * num_clients)
    if shares < num_clients and shares & 1 == 0:
        shares += 1
    return num_clients if shares <= 2 else shares


def secure_settings(own: dict[str, Any]) -> SecureSettings | None:
    """The :class:`SecureSettings` of the app's own run-config keys (:func:`config_from_run_config`), or None
    when ``secure-aggregation`` is false.

    Raises:
        ConfigError: ``secure-aggregation`` not a boolean, or a ``secure-*`` value out of range.
    """
    enabled = own["secure-aggregation"]
    if not isinstance(enabled, bool):
        raise ConfigError(f"run-config key 'secure-aggregation': expected true or false, got {enabled!r}")
    if not enabled:
        return None
    return SecureSettings(own["secure-update-bound"], own["secure-num-shares"], own["secure-reconstruction-threshold"])


def check_secure_supported(config: Config) -> None:
    """Raise ConfigError (one line, naming the config key) for what ``secure-aggregation`` cannot run.

    Under SecAgg+ the server sees only sums over the round's clients: GMA's and the mean's (both are
    sums); not a rule that needs each update (median, trimmed_mean, krum, ...), not a server-side
    check or clip of each update (``server.clip_norm``, ``server.max_update_norm``), not SCAFFOLD
    (its server keeps a control variate per client, updated from each client's own reply), and
    SecAgg+ needs at least 2 clients per round.
    """
    aggregator = config.server.aggregator.name
    if aggregator not in SECURE_AGGREGATORS:
        raise ConfigError(f"config key 'server.aggregator': {aggregator!r} cannot run with secure-aggregation = true "
                          f"(the server sees only sums of the clients' updates); expected one of {SECURE_AGGREGATORS}")
    if config.client.algorithm.name != "sgd":
        raise ConfigError(f"config key 'client.algorithm': {config.client.algorithm.name!r} cannot run with "
                          "secure-aggregation = true (its server needs each client's own update); expected 'sgd' "
                          "(the fedavg, fedavgm, fedprox, fedadam, fedyogi and fedadagrad recipes)")
    for key in ("clip_norm", "max_update_norm"):
        if getattr(config.server, key) is not None:
            raise ConfigError(f"config key 'server.{key}': per-client norms are not visible with "
                              "secure-aggregation = true; expected it unset (secure-update-bound clips each "
                              "coordinate of each update on its client)")
    if config.server.clients_per_round < 2:
        raise ConfigError(f"config key 'server.clients_per_round': secure-aggregation = true needs at least 2 "
                          f"clients per round (SecAgg+), got {config.server.clients_per_round}")


def build_data(config: Config) -> FederatedDataset:
    """The federated data set of a config, exactly as :func:`fedgma.simulation.run` builds it."""
    data = build_federated(config.data, config.seed)
    fraction = getattr(config.data, "validation_fraction", 0.0)
    if fraction and "validation" not in data.extra_tests:
        data = hold_out_validation(data, fraction, config.seed)
    return data


def build_flat_model(config: Config, data: FederatedDataset) -> FlatModel:
    module = build_model(config.model.name, data.input_shape, data.num_classes, torch_generator(config.seed, "init"))
    return FlatModel(module, "cpu")


def config_from_run_config(run_config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """A resolved Config from a Flower run config (the experiment keys, dotted), and the app's own keys.

    The app's own keys are ``run-dir`` (where to write the run folder; empty: nowhere),
    ``round-timeout`` (seconds to wait for a round's replies), ``overwrite`` (replace a finished run
    of another config in ``run-dir``), ``run-dir-locked`` (the process that started the run holds the
    run folder's lock: :func:`~fedgma.flower.launch.run_flower`), ``pull-interval`` / ``max-pull-interval``
    (seconds between pulls of replies, see :class:`~fedgma.flower.strategy.FedgmaStrategy`), ``fedgma-config``
    (a whole experiment config as TOML, which the dotted keys, if any, then override), ``secure-aggregation``
    (true: GMA under Flower's SecAgg+, see :func:`~fedgma.flower.server_app.serve`) and its
    ``secure-update-bound``, ``secure-num-shares``, ``secure-reconstruction-threshold`` (:class:`SecureSettings`).
    """
    own: dict[str, Any] = {"run-dir": "", "round-timeout": 600.0, "overwrite": False, "run-dir-locked": False,
                           "pull-interval": 0.1, "max-pull-interval": 2.0, EXPERIMENT_KEY: "",
                           "secure-aggregation": False, "secure-update-bound": 1.0, "secure-num-shares": 1.0,
                           "secure-reconstruction-threshold": 0.6}
    for key in own.keys() & run_config.keys():
        own[key] = run_config[key]
    raw: dict[str, Any] = tomllib.loads(str(own[EXPERIMENT_KEY])) if own[EXPERIMENT_KEY] else {}
    for key, value in run_config.items():
        if key not in own:
            set_key(raw, key, value)
    return resolve(parse_config(raw)), own

