"""A Flower app (ServerApp + ClientApp) that runs a fedgma experiment config on Flower.

The same experiment config that ``fedgma run`` reads (dataset, partition, model, local training,
aggregator, server optimizer, seed) runs here on Flower's runtimes: the local simulation engine
(Ray) via ``flwr run`` or :func:`run_flower` (``fedgma run CONFIG --engine flower``), or a
deployment (SuperLink + SuperNodes over gRPC).

To make the two engines do the same arithmetic:

* the SuperNode with ``partition-id`` k (``node_config``; Flower's simulation sets it, a deployed
  node gets ``--node-config "partition-id=k num-partitions=N"``) is client k of the config's
  partition, and trains with :func:`fedgma.client.train_client` and the generator
  ``torch_generator(seed, "client", round, k)``, as the sequential backend does;
* the server samples the round's clients with :func:`fedgma.simulation.sample_clients` and sends
  each its message (a first "query" round learns which node holds which partition);
* :class:`FedGMA` aggregates with the core streaming aggregator (via :class:`GMAMixin`) and steps
  with the recipe's own server optimizer (``fedgma.server_opt``), on the flat parameter vector;
* evaluation is central, on the server, every ``eval_every`` rounds, with
  :func:`fedgma.simulation.evaluate`.

The one difference is that a client replies with its model θ + Δ (Flower's convention) and the
server takes Δ' = (θ + Δ) − θ, which differs from Δ by float32 rounding.

The experiment config travels inside every train message (ConfigRecord key ``fedgma-config``, the
resolved TOML), so a ClientApp needs no local files; each ClientApp process builds the federated
data set once per config and keeps it.

Secure aggregation is one run-config key: with ``secure-aggregation = true`` the ServerApp runs the
rounds under Flower's SecAgg+ (:class:`SecureFedGMA`, :func:`fedgma.flower.secure.run_secure`), and
the ClientApp's train function, which always carries :func:`fedgma.flower.secure.fedgma_secaggplus_mod`
(a pass-through for plaintext messages), sends its update encoded and masked: the server learns GMA's
sums only (docs/PRIVACY.md).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import tomllib
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedgma.checkpoint import atomic_write, lock_folder, read_json
from fedgma.client import ClientResult, ScaffoldClient, mean_train_loss, train_client
from fedgma.config import Config, ConfigError, config_to_toml, parse_config, resolve, set_key
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.flower.secure import SecureGMA, fedgma_secaggplus_mod, run_secure
from fedgma.flower.strategy import FedgmaStrategy, InvalidReplyError, StreamingGrid
from fedgma.models import FlatModel, build_model
from fedgma.progress import ProgressBar
from fedgma.seeding import torch_generator
from fedgma.simulation import evaluate, local_settings, sample_clients

__all__ = [
    "EXPERIMENT_KEY",
    "FedGMA",
    "SecureFedGMA",
    "SecureSettings",
    "arrays_to_params",
    "check_secure_supported",
    "check_supported",
    "client_app",
    "config_from_run_config",
    "discover_clients",
    "make_server_app",
    "params_to_arrays",
    "params_to_record",
    "record_to_params",
    "run_flower",
    "secure_settings",
    "serve",
    "server_app",
]

EXPERIMENT_KEY = "fedgma-config"  # ConfigRecord key: the resolved experiment config as TOML
PARTITION_KEY = "partition-id"


# --------------------------------------------------------------------------------------------
# What both sides build from a config
# --------------------------------------------------------------------------------------------


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


def params_to_record(model: FlatModel, params: Tensor) -> ArrayRecord:
    """A flat parameter vector as an ArrayRecord keyed by parameter name, with the parameters' shapes."""
    shapes = {name: tuple(p.shape) for name, p in model.module.named_parameters()}
    return ArrayRecord({
        layer.name: Array(params[layer.start : layer.start + layer.numel].detach().cpu().reshape(shapes[layer.name])
                          .numpy().copy())
        for layer in model.layers
    })


def record_to_params(record: ArrayRecord, model: FlatModel) -> Tensor:
    """The flat parameter vector of an ArrayRecord made by :func:`params_to_record` (checked)."""
    names = [layer.name for layer in model.layers]
    if set(record) != set(names):
        raise ValueError(f"the model arrays {sorted(record)} do not match the model's parameters {names}")
    parts = []
    for layer in model.layers:
        values = record[layer.name].numpy().reshape(-1)
        if values.size != layer.numel:
            raise ValueError(f"array {layer.name!r} has {values.size} values, the model expects {layer.numel}")
        parts.append(torch.from_numpy(values.astype(np.float32, copy=False)))
    return torch.cat(parts)


def params_to_arrays(model: FlatModel, params: Tensor) -> list[np.ndarray]:
    """A flat parameter vector as the list of the parameters' float32 arrays, in parameter order (legacy
    Flower ``Parameters``, as SecAgg+'s workflow sends them)."""
    return [array.numpy() for array in params_to_record(model, params).values()]


def arrays_to_params(arrays: list[np.ndarray], model: FlatModel) -> Tensor:
    """The flat parameter vector of :func:`params_to_arrays`' list (checked: count and sizes).

    Raises:
        ValueError: a number of arrays other than the model's parameters, or an array of the wrong size.
    """
    names = [layer.name for layer in model.layers]
    if len(arrays) != len(names):
        raise ValueError(f"got {len(arrays)} arrays, the model has {len(names)} parameters {names}")
    return record_to_params(ArrayRecord({name: Array(np.asarray(a)) for name, a in zip(names, arrays, strict=True)}),
                            model)


def config_from_run_config(run_config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """A resolved Config from a Flower run config (the experiment keys, dotted), and the app's own keys.

    The app's own keys are ``run-dir`` (where to write the run folder; empty: nowhere),
    ``round-timeout`` (seconds to wait for a round's replies), ``overwrite`` (replace a finished run
    of another config in ``run-dir``), ``run-dir-locked`` (the process that started the run holds the
    run folder's lock: :func:`run_flower`), ``pull-interval`` / ``max-pull-interval`` (seconds between
    pulls of replies, see :class:`FedgmaStrategy`), ``fedgma-config`` (a whole experiment config as TOML,
    which the dotted keys, if any, then override), ``secure-aggregation`` (true: GMA under Flower's
    SecAgg+, see :func:`serve`) and its ``secure-update-bound``, ``secure-num-shares``,
    ``secure-reconstruction-threshold`` (:class:`SecureSettings`).
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


# --------------------------------------------------------------------------------------------
# ClientApp
# --------------------------------------------------------------------------------------------


class _Client:
    """What a ClientApp process builds once per experiment config."""

    def __init__(self, config_toml: str) -> None:
        self.config = resolve(parse_config(tomllib.loads(config_toml)))
        self.data = build_data(self.config)
        self.model = build_flat_model(self.config, self.data)
        self.settings = local_settings(self.config)


@functools.lru_cache(maxsize=2)
def _client_for(config_toml: str) -> _Client:
    threads = int(os.environ.get("FEDGMA_CLIENT_THREADS", "1"))
    torch.set_num_threads(threads)  # several ClientApps share the machine's cores
    return _Client(config_toml)


def _partition_id(context: Context) -> int:
    if PARTITION_KEY not in context.node_config:
        raise ValueError(
            f"this SuperNode has no {PARTITION_KEY!r} in its node config; start it with "
            f"--node-config \"{PARTITION_KEY}=K num-partitions=N\""
        )
    return int(context.node_config[PARTITION_KEY])


# SCAFFOLD on Flower. The server sends c (ArrayRecord SCAFFOLD_C), its run's token (SCAFFOLD_RUN) and
# the last round in which this client's reply was committed (SCAFFOLD_COMMITTED); the client keeps its
# c_i in its Context state (SCAFFOLD_CI) and the c_i⁺ of its latest reply as pending (SCAFFOLD_PENDING,
# its round and the token in SCAFFOLD_META), which becomes its c_i only once the server says that
# reply was committed: a dropped reply or a skipped round leaves c_i as it was, as on the simulator.
# A different token (another experiment in the same Flower run) starts from c_i = 0.
SCAFFOLD_C = "scaffold-c"
SCAFFOLD_RUN = "scaffold-run"
SCAFFOLD_COMMITTED = "scaffold-committed-round"
SCAFFOLD_CI = "scaffold-ci"
SCAFFOLD_PENDING = "scaffold-pending"
SCAFFOLD_META = "scaffold-meta"


def _flat_record(values: Tensor) -> ArrayRecord:
    return ArrayRecord({"values": Array(values.detach().cpu().numpy().copy())})


def _flat_of(record: ArrayRecord, numel: int) -> Tensor:
    values = np.asarray(record["values"].numpy(), dtype=np.float32).reshape(-1)
    if values.size != numel:
        raise ValueError(f"a SCAFFOLD control variate has {values.size} values, the model {numel}")
    return torch.from_numpy(values.copy())


def _client_control(context: Context, run: str, committed_round: int, numel: int) -> Tensor:
    """This client's c_i (zeros before its first committed reply), first promoting a pending c_i⁺ now committed."""
    state = context.state
    meta = state.config_records.get(SCAFFOLD_META)
    if meta is None or meta["run"] != run:  # first round of this experiment here
        for key in (SCAFFOLD_CI, SCAFFOLD_PENDING):
            if key in state:
                del state[key]
        state[SCAFFOLD_META] = meta = ConfigRecord({"run": run, "pending-round": -1})
    if SCAFFOLD_PENDING in state.array_records:
        if int(meta["pending-round"]) == committed_round:
            state[SCAFFOLD_CI] = state[SCAFFOLD_PENDING]
        del state[SCAFFOLD_PENDING]  # committed now, or its reply was dropped / its round skipped
    if SCAFFOLD_CI in state.array_records:
        return _flat_of(state.array_records[SCAFFOLD_CI], numel)
    return torch.zeros(numel)


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    """Tell the server which client (partition) this node is."""
    return Message(RecordDict({"metrics": MetricRecord({PARTITION_KEY: _partition_id(context)})}), reply_to=msg)


@client_app.train(mods=[fedgma_secaggplus_mod])
def _train(msg: Message, context: Context) -> Message:
    """Local training of this node's client from the received global model (fedgma.client.train_client).

    A plaintext train message (``arrays`` + ``config``) is answered with ``arrays`` (θ + Δ) and
    ``metrics``. Under ``secure-aggregation`` the message is a legacy ``FitIns`` of Flower's SecAgg+
    workflow (``fitins.parameters``: the model's arrays in parameter order): the reply is a ``FitRes``
    (θ + Δ, ``num_examples``, no metrics in clear), which :func:`fedgma.flower.secure.fedgma_secaggplus_mod`
    (this function's mod; a pass-through for plaintext messages) encodes, quantizes and masks.
    """
    if _SECURE_PARAMETERS in msg.content.array_records:
        return _train_secure(msg, context)
    config_record = msg.content["config"]
    client = _client_for(str(config_record[EXPERIMENT_KEY]))
    params = record_to_params(msg.content["arrays"], client.model)
    result = _local_training(client, context, config_record, params, msg.content.array_records.get(SCAFFOLD_C))
    metrics = MetricRecord({
        "num-examples": int(result.num_samples),
        "train_loss": float(result.train_loss),
        "num-steps": int(result.num_steps),
        "client-id": int(result.client_id),
    })
    arrays = params_to_record(client.model, params + result.update)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


_SECURE_PARAMETERS = "fitins.parameters"  # the ArrayRecord of a legacy FitIns (flwr.compat's naming)


def _train_secure(msg: Message, context: Context) -> Message:
    """The ClientApp's work in a SecAgg+ round: legacy FitIns in, FitRes (θ + Δ, n_k; no metrics) out."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    client = _client_for(str(fitins.config[EXPERIMENT_KEY]))
    params = arrays_to_params(parameters_to_ndarrays(fitins.parameters), client.model)
    result = _local_training(client, context, fitins.config, params, None)
    # no train loss or step count in clear: the step count would tell n_k, which the secure mod hides
    fitres = FitRes(status=Status(code=Code.OK, message=""), num_examples=int(result.num_samples), metrics={},
                    parameters=ndarrays_to_parameters(params_to_arrays(client.model, params + result.update)))
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def _local_training(client: _Client, context: Context, config_record: Any, params: Tensor,
                    scaffold_c: ArrayRecord | None) -> ClientResult:
    """train_client for this node's client (checked against the message's ``client-id``), SCAFFOLD if sent c."""
    client_id = _partition_id(context)
    expected = config_record.get("client-id")
    if expected is not None and int(expected) != client_id:
        raise ValueError(f"message for client {expected} reached the node of client {client_id}")
    if not 0 <= client_id < client.data.num_clients:
        raise ValueError(f"partition-id {client_id} is outside the config's {client.data.num_clients} clients")
    round_index = int(config_record["server-round"])
    seed = client.config.seed
    correction = control = server_control = None
    if scaffold_c is not None:  # SCAFFOLD: gradient correction c − c_i
        server_control = _flat_of(scaffold_c, client.model.numel)
        control = _client_control(context, str(config_record[SCAFFOLD_RUN]), int(config_record[SCAFFOLD_COMMITTED]),
                                  client.model.numel)
        correction = server_control - control
    result = train_client(
        client.model, params, client.data.clients[client_id], client.settings,
        torch_generator(seed, "client", round_index, client_id), correction=correction, client_id=client_id,
    )
    if control is not None and server_control is not None and result.num_steps:
        # option II, as ScaffoldClient.finish_client: c_i⁺ = c_i − c − Δ/(K η_l); kept until committed
        pending = control + (-server_control - result.update / (result.num_steps * client.settings.lr))
        context.state[SCAFFOLD_PENDING] = _flat_record(pending)
        context.state.config_records[SCAFFOLD_META]["pending-round"] = round_index
    return result


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on this node's training partition."""
    config_record = msg.content["config"]
    client = _client_for(str(config_record[EXPERIMENT_KEY]))
    client_id = _partition_id(context)
    params = record_to_params(msg.content["arrays"], client.model)
    result = evaluate(client.model, params, client.data.clients[client_id])
    size = len(client.data.clients[client_id])
    metrics = {"num-examples": size, "loss": result["loss"], "accuracy": result["accuracy"]}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# --------------------------------------------------------------------------------------------
# The server side
# --------------------------------------------------------------------------------------------


class ServerScaffold(ScaffoldClient):
    """The server side of SCAFFOLD on Flower: c only; each c_i lives on its client (Context state).

    c moves as :class:`fedgma.client.ScaffoldClient` moves it, c ← c + (1/N) Σ_{i ∈ S} (c_i⁺ − c_i),
    from c_i⁺ − c_i = −c − Δ_i/(K_i η_l), which needs no c_i; ``state_dict`` is ScaffoldClient's
    (its c_i store stays empty).
    """

    def finish_client(self, result: ClientResult) -> None:
        if self._delta_sum is None:
            raise RuntimeError("scaffold: finish_client called outside a round (call begin_round first)")
        control_delta = -self.server_control - result.update / (result.num_steps * self.settings.lr)
        self._delta_sum += control_delta


class FedGMA(FedgmaStrategy):
    """A fedgma config as a Flower strategy: fedgma's client sampling, and fedgma's own round.

    ``configure_train`` sends the clients :func:`fedgma.simulation.sample_clients` draws for the
    round to the nodes holding those partitions (nodes that have gone are skipped, and the round
    goes on with the rest if at least ``server.min_clients`` reply); ``aggregate_train`` is
    :class:`FedgmaStrategy`'s (every reply checked, then :func:`fedgma.round.run_round`), on the
    :class:`fedgma.round.ServerState` that :func:`fedgma.simulation.build_state` builds, with the
    aggregator of :func:`fedgma.simulation.aggregator_factory` (per-layer statistics, clipping).
    A reply must also say which client it is (``client-id``, one of the round's sampled clients,
    once) and how many local steps it took (``num-steps``).
    """

    def __init__(self, config: Config, model: FlatModel, connect_timeout: float = 120.0, **kwargs: Any) -> None:
        from fedgma import simulation

        server = config.server
        super().__init__(
            aggregator=server.aggregator.name, aggregator_options=dict(server.aggregator.options),
            optimizer=server.optimizer.name, optimizer_options=dict(server.optimizer.options),
            clip_norm=server.clip_norm, max_update_norm=server.max_update_norm,
            on_invalid=server.on_bad_update, min_replies=server.min_clients,
            min_available_nodes=1, min_train_nodes=1, **kwargs,
        )
        self.config = config
        self.model = model
        self.config_toml = config_to_toml(config)
        self.state = simulation.build_state(config, model, config.data.num_clients)
        self.scaffold = config.client.algorithm.name == "scaffold"
        if self.scaffold:
            self.state.client_algorithm = ServerScaffold(local_settings(config), model.numel,
                                                         config.data.num_clients)
        self.committed_round: dict[int, int] = {}  # client -> last round whose reply from it was committed
        self.run_token = uuid.uuid4().hex  # tells clients' SCAFFOLD state of this experiment from another's
        self.new_aggregator = simulation.aggregator_factory(config, model)
        self.connect_timeout = connect_timeout
        self.node_of_client: dict[int, int] | None = None
        self.last_update_norm = 0.0
        self.sampled: list[int] = []
        self._seen: set[int] = set()
        self.unreachable: list[int] = []  # sampled clients whose node was gone when the round was configured

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> list[Message]:
        """No federated evaluation: the run evaluates centrally (``evaluate_fn``), as the simulator does."""
        return []

    def _state_for(self, layout: Any, flat: Tensor) -> Any:
        if layout.numel != self.model.numel or layout.dtype != torch.float32:
            raise ValueError(f"the global model has {layout.numel} {layout.dtype} values, the config's model "
                             f"{self.model.numel} float32")
        return self.state

    def _new_aggregator(self, round_index: int = 0) -> Any:
        return self.new_aggregator(round_index)

    def parse_reply(self, index: int, node: str, content: RecordDict) -> ClientResult:
        metrics = content["metrics"] if "metrics" in content.metric_records else None
        if metrics is None:
            raise InvalidReplyError("the reply has no MetricRecord 'metrics'")
        client_id = _integer(metrics, "client-id")
        if client_id not in self.sampled or client_id in self._seen:
            raise InvalidReplyError(f"client-id {client_id} was not sampled this round, or replied twice")
        _integer(metrics, "num-steps")
        _number(metrics, "train_loss")
        result = super().parse_reply(index, node, content)
        self._seen.add(client_id)
        result.client_id = client_id
        return result

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """:meth:`FedgmaStrategy.aggregate_train`, recording what the run folder logs."""
        self._seen = set()
        arrays, metrics = super().aggregate_train(server_round, replies)
        outcome = self.last_round.get("outcome")
        if outcome is not None and outcome.committed:
            for result in outcome.accepted:
                self.committed_round[result.client_id] = server_round
            self.last_update_norm = float(outcome.update.norm())
            self.last_round["stats"] = {k: v for k, v in outcome.stats.items() if not isinstance(v, torch.Tensor)}
            self.last_round["algorithm_stats"] = dict(outcome.algorithm_stats)
        return arrays, metrics

    def _discover(self, grid: Grid) -> dict[int, int]:
        """Which node holds which client (:func:`discover_clients`)."""
        return discover_clients(grid, self.config.data.num_clients, self.connect_timeout, self.pull_interval)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        self.current_arrays = arrays
        if self.node_of_client is None:
            self.node_of_client = self._discover(grid)
        self.sampled = sample_clients(
            self.config.seed, server_round, self.config.data.num_clients, self.config.server.clients_per_round
        )
        online = set(grid.get_node_ids())  # the SuperLink lists the nodes it holds online (heartbeats)
        control = _flat_record(self.state.client_algorithm.server_control) if self.scaffold else None
        messages = []
        self.unreachable = []
        for client_id in self.sampled:
            node = self.node_of_client[client_id]
            if node not in online:
                log(WARNING, "round %d: client %d (node %d) is no longer connected; skipped",
                    server_round, client_id, node)
                self.unreachable.append(client_id)
                continue
            content = ConfigRecord({
                **config, "server-round": server_round, "client-id": client_id, EXPERIMENT_KEY: self.config_toml,
            })
            records: dict[str, Any] = {self.arrayrecord_key: arrays, self.configrecord_key: content}
            if self.scaffold:
                records[SCAFFOLD_C] = control
                content[SCAFFOLD_COMMITTED] = self.committed_round.get(client_id, 0)
                content[SCAFFOLD_RUN] = self.run_token
            messages.append(Message(RecordDict(records), dst_node_id=node, message_type=MessageType.TRAIN,
                                    group_id=str(server_round)))
        log(INFO, "configure_train: round %d, clients %s", server_round, self.sampled)
        return messages

    def client_of_node(self, node: str | int) -> int | str:
        """The client (partition) a node id holds; the node id itself if unknown."""
        for client_id, node_id in (self.node_of_client or {}).items():
            if str(node_id) == str(node):
                return client_id
        return node

class SecureFedGMA(SecureGMA):
    """A fedgma config run under Flower's SecAgg+: :class:`fedgma.flower.secure.SecureGMA` with the config's
    aggregator (``gma`` with its threshold / hard / weighted_agreement, or ``mean`` = GMA with τ = 0, whose
    mask is all ones), the config's server optimizer, and fedgma's client sampling.

    ``sample_fit`` sends the round's :func:`fedgma.simulation.sample_clients` (as the simulator and
    :class:`FedGMA` do) to the nodes holding them (``node_of_client``, :func:`discover_clients`); a
    sampled client whose node is no longer connected is skipped (``unreachable``). A round whose secure
    sum holds fewer than ``server.min_clients`` clients is skipped (model unchanged). ``evaluate_fn(round,
    arrays)`` is called after every round (and with round 0 before the first), as the legacy workflow
    calls a strategy's ``evaluate``.

    Raises:
        ConfigError: a config that secure aggregation cannot run (:func:`check_secure_supported`).
    """

    def __init__(self, config: Config, model: FlatModel, node_of_client: dict[int, int], max_examples: int,
                 settings: SecureSettings, evaluate_fn: Callable[[int, list[np.ndarray]], None] | None = None
                 ) -> None:
        from fedgma.aggregation import GMAOptions

        check_secure_supported(config)
        server = config.server
        gma_options = (GMAOptions(**dict(server.aggregator.options)) if server.aggregator.name == "gma"
                       else GMAOptions(threshold=0.0))
        super().__init__(
            threshold=gma_options.threshold, hard=gma_options.hard, weighted_agreement=gma_options.weighted_agreement,
            optimizer=server.optimizer.name, optimizer_options=dict(server.optimizer.options),
            update_bound=float(settings.update_bound), max_examples=max_examples,
            max_clients=server.clients_per_round, fraction_evaluate=0.0,
            initial_parameters=ndarrays_to_parameters(params_to_arrays(model, model.params)),
        )
        self.config = config
        self.config_toml = config_to_toml(config)
        self.node_of_client = dict(node_of_client)
        self.client_of_node = {node: client for client, node in self.node_of_client.items()}
        self.after_round = evaluate_fn
        self.sampled: list[int] = []
        self.sent: list[int] = []
        self.unreachable: list[int] = []

    def sample_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[tuple[Any, Any]]:
        config = self.config
        self.sampled = sample_clients(config.seed, server_round, config.data.num_clients,
                                      config.server.clients_per_round)
        proxies = {int(proxy.node_id): proxy for proxy in client_manager.all().values()}
        pairs, self.sent, self.unreachable = [], [], []
        for client_id in self.sampled:
            proxy = proxies.get(self.node_of_client[client_id])
            if proxy is None:
                log(WARNING, "round %d: client %d (node %d) is no longer connected; skipped",
                    server_round, client_id, self.node_of_client[client_id])
                self.unreachable.append(client_id)
                continue
            fit_config = {EXPERIMENT_KEY: self.config_toml, "server-round": server_round, "client-id": client_id}
            pairs.append((proxy, FitIns(parameters, fit_config)))
            self.sent.append(client_id)
        log(INFO, "configure_fit (secure): round %d, clients %s", server_round, self.sampled)
        return pairs

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, FitRes]], failures: list[Any]
                      ) -> tuple[Parameters | None, dict[str, Any]]:
        """SecureGMA's, skipped (model unchanged) below ``server.min_clients`` clients in the secure sum."""
        aggregated = sorted(self.client_of_node.get(int(proxy.node_id), -1) for proxy, _ in results)
        if len(results) < self.config.server.min_clients:
            log(WARNING, "round %d: %d clients in the secure sum < server.min_clients = %d; round skipped",
                server_round, len(results), self.config.server.min_clients)
            self.last_round = {"round": server_round, "num_clients": len(results), "aggregated": aggregated}
            return None, {}
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        self.last_round.update(aggregated=aggregated, committed=parameters is not None)
        return parameters, metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Any]] | None:
        """Not an evaluation of its own: hands the round's model to ``evaluate_fn`` (the run's bookkeeping)."""
        if self.after_round is not None:
            self.after_round(server_round, parameters_to_ndarrays(parameters))
        return None

    def round_stats(self, server_round: int) -> dict[str, Any] | None:
        """What the run folder logs of a committed round (None if the round was skipped or halted)."""
        last = self.last_round
        if last.get("round") != server_round or not last.get("committed"):
            return None
        agreement, mask = last["agreement"], last["mask"]
        sums = last["sums"]
        return {
            "mask_density": float(mask.float().mean()),
            "mask_pass_fraction": float(torch.count_nonzero(agreement >= self.threshold)) / max(agreement.numel(), 1),
            "agreement_mean": float(agreement.float().mean()),
            "secure_num_clients": int(last["num_clients"]),
            "secure_num_dropped": int(last["num_dropped"]),
            "secure_total_examples": int(sums["total_examples"]),
            "secure_clipped_fraction": float(sums["clipped_fraction"]),
            "secure_update_error_bound": float(last["update_error_bound"]),
        }


def discover_clients(grid: Grid, num_clients: int, timeout: float = 120.0, pull_interval: float = 0.1
                     ) -> dict[int, int]:
    """Which node holds which client: wait for ``num_clients`` nodes, then ask each (a Flower "query"
    message, answered by this module's ClientApp with its ``partition-id``); ``{client id: node id}``.

    Raises:
        TimeoutError: fewer than ``num_clients`` nodes connected within ``timeout`` seconds.
        ValueError: two nodes hold the same client, or no node holds some client.
    """
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {num_clients} SuperNodes connected in {timeout} s")
        time.sleep(0.5)
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    replies = StreamingGrid(grid, pull_interval).send_and_receive(messages, timeout=timeout)
    mapping: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            log(WARNING, "node %s did not say which client it is: %s", reply.metadata.src_node_id, reply.error.reason)
            continue
        client_id = int(reply.content["metrics"][PARTITION_KEY])
        if client_id in mapping:
            raise ValueError(f"nodes {mapping[client_id]} and {reply.metadata.src_node_id} both hold client "
                             f"{client_id}")
        mapping[client_id] = int(reply.metadata.src_node_id)
    missing = sorted(set(range(num_clients)) - set(mapping))
    if missing:
        raise ValueError(f"no connected SuperNode holds client(s) {missing[:10]} "
                         f"(partition-id in 0..{num_clients - 1})")
    log(INFO, "fedgma: %d clients mapped to SuperNodes", len(mapping))
    return mapping


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidReplyError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(metrics: MetricRecord, key: str) -> int:
    value = _number(metrics, key)
    if value != int(value) or value < 0:
        raise InvalidReplyError(f"{key} must be an integer ≥ 0, got {value!r}")
    return int(value)


def serve(grid: Grid, config: Config, run_dir: str | Path | None, progress: bool = False,
          round_timeout: float = 600.0, overwrite: bool = False, lock: bool = True,
          secure: SecureSettings | None = None, **strategy_options: Any) -> dict[str, Any]:
    """The ServerApp's work: run ``config`` on the nodes of ``grid``; write the run folder; return the summary.

    The run folder has the files :func:`fedgma.simulation.run` writes (``config.toml``,
    ``partition.json``, ``rounds.jsonl``, ``metrics.jsonl``, ``summary.json`` last,
    ``final_model.pt``), with ``"engine": "flower"`` in the summary, and the same safety:
    ``config.toml``, ``final_model.pt`` and ``summary.json`` are written atomically
    (:func:`fedgma.checkpoint.atomic_write`; ``summary.json`` last, the "finished" mark), the folder
    is locked for the run's life (:func:`fedgma.checkpoint.lock_folder`; ``lock=False`` when the
    caller already holds it, as :func:`run_flower` does), and a folder holding a finished run of
    another config is refused (:class:`~fedgma.checkpoint.RunFolderError`) unless ``overwrite``.
    ``strategy_options`` go to :class:`FedGMA` (e.g. ``pull_interval``).

    With ``secure`` (the app's ``secure-aggregation = true``), the rounds run under Flower's SecAgg+
    (:class:`SecureFedGMA` in Flower's legacy workflow, :func:`fedgma.flower.secure.run_secure`; the
    ClientApp's mod :func:`fedgma.flower.secure.fedgma_secaggplus_mod` encodes each update): the same
    client sampling, aggregator (gma or mean) and server optimizer, on sums only. ``round_timeout``
    bounds each SecAgg+ stage; ``strategy_options`` then only give ``pull_interval`` and
    ``connect_timeout`` to :func:`discover_clients`. The clients send no train loss or step count in
    clear, so ``rounds.jsonl`` and ``metrics.jsonl`` have none (``total_local_steps`` is null in the
    summary); the rounds log ``secure_aggregation: true`` and the secure sum's ``secure_num_clients``,
    ``secure_num_dropped``, ``secure_total_examples`` and ``secure_clipped_fraction``; the summary
    has the ``secure_aggregation`` settings.

    Raises:
        ConfigError: a config the Flower engine (:func:`check_supported`) or, with ``secure``, secure
        aggregation (:func:`check_secure_supported`) cannot run.
    """
    out = Path(run_dir) if run_dir else None
    if out is None or not lock:
        return _serve(grid, config, out, progress, round_timeout, overwrite, strategy_options, secure)
    with lock_folder(out, "run"):
        return _serve(grid, config, out, progress, round_timeout, overwrite, strategy_options, secure)


def _start_run_folder(out: Path, config: Config, overwrite: bool) -> None:
    """Refuse a folder holding another config's results (unless ``overwrite``); clear an old run's files."""
    from fedgma import simulation

    if not overwrite:
        simulation._refuse_another_config(out, config)
    simulation._clear_run(out)


def _serve(grid: Grid, config: Config, out: Path | None, progress: bool, round_timeout: float,
           overwrite: bool, strategy_options: dict[str, Any], secure: SecureSettings | None = None) -> dict[str, Any]:
    from fedgma import simulation

    check_supported(config)
    if secure is not None:
        check_secure_supported(config)
        secure.check_clients_per_round(config.server.clients_per_round)
    start_time = time.perf_counter()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _start_run_folder(out, config, overwrite)
        atomic_write(out / "config.toml", config_to_toml(config).encode())
    if config.threads:
        torch.set_num_threads(config.threads)
    data = build_data(config)
    model = build_flat_model(config, data)
    params = model.params.clone()
    initial = simulation.evaluate_all(model, params, data)
    history: list[dict[str, Any]] = []
    state = {"total_steps": 0, "round_start": time.perf_counter()}
    logs = {}
    if out is not None:
        (out / "partition.json").write_text(json.dumps(data.statistics))
        logs = {name: open(out / f"{name}.jsonl", "w", buffering=1) for name in ("rounds", "metrics")}  # noqa: SIM115
    bar = simulation.ProgressBar(config.rounds, progress)

    def write(name: str, record: dict[str, Any]) -> None:
        if name in logs:
            logs[name].write(json.dumps(record) + "\n")

    def log_round(server_round: int, round_record: dict[str, Any], stats: dict[str, Any],
                  current: Callable[[], Tensor]) -> MetricRecord | None:
        """Write the round's record; evaluate the model ``current()`` if due and write that too."""
        write("rounds", round_record)
        state["round_start"] = time.perf_counter()
        if server_round % config.eval_every and server_round != config.rounds:
            bar.update(server_round)
            return None
        now = current()
        record = {"round": server_round, **simulation.evaluate_all(model, now, data)}
        if "train_loss" in round_record:  # not sent in clear under secure aggregation
            record.update(train_loss=round_record["train_loss"], total_local_steps=state["total_steps"])
        record.update({k: v for k, v in stats.items() if isinstance(v, float)})
        record["elapsed_s"] = time.perf_counter() - start_time
        write("metrics", record)
        history.append(record)
        bar.update(server_round, record)
        if server_round == config.rounds:
            state["final"] = now
        return MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float)) and "/" not in k})

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        last = strategy.last_round if strategy.last_round.get("round") == server_round else {}
        outcome = last.get("outcome")
        accepted = list(outcome.accepted) if outcome is not None else []
        committed = outcome is not None and outcome.committed
        stats = dict(last.get("stats", {})) if committed else {}
        stats.pop("num_clients", None)
        steps = sum(r.num_steps for r in accepted)
        state["total_steps"] += steps
        round_record = {
            "round": server_round,
            "clients": strategy.sampled,
            # the clients whose replies were aggregated (the sampled ones less unreachable, lost, dropped;
            # none when the round was skipped for having fewer than server.min_clients valid replies)
            "aggregated": sorted(r.client_id for r in accepted) if committed else [],
            "train_loss": mean_train_loss(accepted),
            "local_steps": steps,
            "update_norm": strategy.last_update_norm if committed else 0.0,
            **({} if committed else {"skipped": True}),
            **(last.get("algorithm_stats", {}) if committed else {}),
            **stats,
            **({"dropped": {node: why for node, why in last["dropped"]}} if last.get("dropped") else {}),
            # sampled, but the node was offline when the round began (not sent) / vanished during the round
            **({"unreachable": list(strategy.unreachable)} if strategy.unreachable else {}),
            **({"lost": {str(strategy.client_of_node(node)): why for node, why in last["lost"]}}
               if last.get("lost") else {}),
            "round_s": time.perf_counter() - state["round_start"],
        }
        return log_round(server_round, round_record, stats, lambda: record_to_params(arrays, model))

    def after_secure_round(server_round: int, arrays: list[np.ndarray]) -> None:
        if server_round == 0:
            return
        stats = strategy.round_stats(server_round)
        last = strategy.last_round if strategy.last_round.get("round") == server_round else {}
        summed = list(last.get("aggregated", []))
        lost = [client for client in strategy.sent if client not in summed]  # dropped out of the protocol
        round_record = {
            "round": server_round,
            "clients": strategy.sampled,
            # the clients whose vectors are in the secure sum (none when the round was skipped: fewer than
            # server.min_clients in the sum, SecAgg+ halted for too many dropouts, or a non-finite step)
            "aggregated": summed if stats is not None else [],
            "update_norm": float(last["aggregate"].norm()) if stats is not None else 0.0,
            **({} if stats is not None else {"skipped": True}),
            "secure_aggregation": True,
            **(stats or {}),
            **({"unreachable": list(strategy.unreachable)} if strategy.unreachable else {}),
            **({"lost": {str(client): "not in the secure sum (dropped out of SecAgg+)" for client in lost}}
               if lost else {}),
            "round_s": time.perf_counter() - state["round_start"],
        }
        log_round(server_round, round_record, stats or {}, lambda: arrays_to_params(arrays, model))

    strategy: Any
    try:
        if secure is None:
            strategy = FedGMA(config, model, **strategy_options)
            strategy.start(grid, params_to_record(model, params), num_rounds=config.rounds, timeout=round_timeout,
                           train_config=ConfigRecord(), evaluate_fn=after_round)
        else:
            node_of_client = discover_clients(grid, config.data.num_clients,
                                              float(strategy_options.get("connect_timeout", 120.0)),
                                              float(strategy_options.get("pull_interval", 0.1)))
            strategy = SecureFedGMA(config, model, node_of_client, max(len(c) for c in data.clients), secure,
                                    evaluate_fn=after_secure_round)
            # a Context of its own: the legacy workflow keeps its state there (not in the ServerApp's)
            legacy = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
            run_secure(grid, legacy, strategy, config.rounds, num_shares=secure.num_shares,
                       reconstruction_threshold=secure.reconstruction_threshold, timeout=round_timeout)
    finally:
        bar.close()
        for handle in logs.values():
            handle.close()
    if not history:
        raise RuntimeError("the run ended without an evaluation of its last round")
    summary = simulation.summarize(config, history, state["total_steps"], time.perf_counter() - start_time)
    summary["initial"] = initial
    summary["engine"] = "flower"
    if secure is not None:
        summary["total_local_steps"] = None  # the clients do not send their step counts in clear
        summary["secure_aggregation"] = {"update_bound": secure.update_bound, "num_shares": secure.num_shares,
                                         "reconstruction_threshold": secure.reconstruction_threshold}
    if out is not None:
        model_bytes = io.BytesIO()
        torch.save({"round": config.rounds, "params": state.get("final", params).cpu()}, model_bytes)
        atomic_write(out / "final_model.pt", model_bytes.getvalue())
        atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())  # last: the "finished" mark
    return summary


def make_server_app(config: Config, run_dir: str | Path | None, progress: bool = False,
                    round_timeout: float = 600.0, overwrite: bool = False, lock: bool = True,
                    secure: SecureSettings | None = None) -> ServerApp:
    """A ServerApp that runs ``config`` (:func:`serve`), for running in this process (tests)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, config, run_dir, progress, round_timeout, overwrite, lock, secure)

    return app


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """``flwr run``: the experiment is the app's run config ([tool.flwr.app.config], --run-config);
    ``secure-aggregation = true`` runs it under Flower's SecAgg+ (:func:`serve`)."""
    config, own = config_from_run_config(dict(context.run_config))
    secure = secure_settings(own)
    options = {"pull_interval": float(own["pull-interval"])}
    if secure is None:
        options["max_pull_interval"] = float(own["max-pull-interval"])
    serve(grid, config, own["run-dir"] or None, False, float(own["round-timeout"]), bool(own["overwrite"]),
          not own["run-dir-locked"], secure, **options)


# --------------------------------------------------------------------------------------------
# fedgma run --engine flower: `flwr run` against a SuperLink of its own
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flower_app_files(config: Config, run_dir: Path, round_timeout: float = 600.0,
                     secure: SecureSettings | None = None) -> dict[str, str]:
    """The files of a one-run Flower app (its ``pyproject.toml``): fedgma's ServerApp and ClientApp, and
    the experiment as the app's run config (the resolved config as TOML under ``fedgma-config``; with
    ``secure``, ``secure-aggregation = true`` and its settings)."""
    secure_keys = {} if secure is None else {
        "secure-aggregation": True, "secure-update-bound": float(secure.update_bound),
        "secure-num-shares": secure.num_shares, "secure-reconstruction-threshold": secure.reconstruction_threshold,
    }
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedgma-run", "version": "1.0.0", "description": "one fedgma run on Flower",
                    "license": "Apache-2.0", "dependencies": []},
        "tool": {"flwr": {"app": {
            "publisher": "fedgma",
            "components": {"serverapp": "fedgma.flower.app:server_app", "clientapp": "fedgma.flower.app:client_app"},
            "config": {"run-dir": str(run_dir.resolve()), "round-timeout": float(round_timeout),
                       "overwrite": True, "run-dir-locked": True, EXPERIMENT_KEY: config_to_toml(config),
                       # on the simulation runtime a pull of replies is an in-memory call: pull often, so
                       # that a round ends within 10 ms of its last reply (not up to 2 s later, the backoff)
                       "pull-interval": 0.005, "max-pull-interval": 0.01, **secure_keys},
        }}},
    }
    return {"pyproject.toml": tomli_w.dumps(project)}


class LocalSuperLink:
    """A SuperLink in simulation mode on a free loopback port, for one ``flwr run``; ended on ``close``.

    Everything lives in ``root`` (its own ``FLWR_HOME`` naming the SuperLink ``fedgma``, the app,
    the SuperLink's log); the SuperLink runs in its own session and ``close`` ends its whole process
    group (SuperLink, SuperExec, the simulation process and Ray's workers), SIGTERM then SIGKILL.
    """

    NAME = "fedgma"

    def __init__(self, root: Path, env: dict[str, str] | None = None, start_timeout: float = 60.0) -> None:
        self.root = root
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "superlink.log"
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ, **(env or {}),
            "FLWR_HOME": str(self.home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the apps run in this environment
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # Ray's FutureWarning about num_gpus=0
            "PYTHONUNBUFFERED": "1",
        }
        self.process: subprocess.Popen[bytes] | None = None
        for _attempt in range(3):  # a free port may be taken between the probe and the bind
            self.port = _free_port()
            if self._start(start_timeout):
                break
        else:
            raise RuntimeError(f"flower-superlink did not start; see {self.log_path}:\n{self.tail()}")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.NAME}"\n\n[superlink.{self.NAME}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def _start(self, timeout: float) -> bool:
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
                 "--isolation", "subprocess", "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log_file, stderr=subprocess.STDOUT, env=self.env, cwd=self.root, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if f"running on http://127.0.0.1:{self.port}" in self.log_path.read_text(errors="replace"):
                return True
            time.sleep(0.1)
        self.close()
        return False

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self, grace_s: float = 10.0) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace_s)
        with contextlib.suppress(ProcessLookupError):  # the group may outlive its leader
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None


def _follow_progress(run_dir: Path, bar: Any, done: threading.Event) -> None:
    """Drive ``bar`` from the run folder's logs while the ServerApp (another process) writes them."""
    seen_rounds = seen_metrics = 0
    while True:
        finished = done.wait(0.5)
        with contextlib.suppress(OSError, ValueError):
            rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
            metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
            for line in metrics[seen_metrics:]:
                record = json.loads(line)
                bar.update(int(record["round"]), record)
                seen_metrics += 1
            complete = [line for line in rounds if line.endswith("}")]
            if len(complete) > seen_rounds:
                seen_rounds = len(complete)
                bar.update(int(json.loads(complete[-1])["round"]))
        if finished:
            return


def run_flower(config: Config, run_dir: str | Path, progress: bool = True, num_cpus: int | None = None,
               client_cpus: float = 1.0, verbose: bool | None = None, overwrite: bool = False,
               round_timeout: float = 600.0, secure: bool | SecureSettings = False) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation runtime (Ray), one virtual SuperNode per client; return the summary.

    The way flwr 1.41 asks for (its Python ``run_simulation`` is deprecated in favour of ``flwr run``):
    starts a SuperLink in simulation mode on a free loopback port (:class:`LocalSuperLink`), ``flwr
    run``s a one-run Flower app of fedgma's ServerApp and ClientApp (:func:`flower_app_files`) on it,
    and ends the SuperLink and everything it started when the run is over (or fails, or is
    interrupted). Writes the same run folder as :func:`fedgma.simulation.run`, with the same safety:
    the folder is locked for the run's life, a finished run of another config is refused
    (:class:`~fedgma.checkpoint.RunFolderError`) unless ``overwrite``, and the final files are written
    atomically; Flower's log (the run's log stream) is kept in ``flower.log`` in the run folder.

    ``num_cpus`` caps the CPUs Ray may use (default: all), ``client_cpus`` (whole CPUs) is what one
    ClientApp reserves. Flower's output is shown only if ``verbose`` (default: ``FEDGMA_VERBOSE=1``).
    ``secure`` (True: :class:`SecureSettings`' defaults), or the config's ``server.secure_aggregation``,
    runs the rounds under Flower's SecAgg+ (the app's ``secure-aggregation = true``, :func:`serve`).

    Raises:
        ConfigError: a setting the Flower engine does not run. FolderInUseError, RunFolderError: see above.
        RuntimeError: the run ended without a summary (with the end of Flower's log).
    """
    check_supported(config)
    secure = secure or config.server.secure_aggregation
    settings = SecureSettings() if secure is True else (secure or None)
    if settings is not None:
        check_secure_supported(config)
        settings.check_clients_per_round(config.server.clients_per_round)
    if client_cpus != int(client_cpus) or client_cpus < 1:
        raise ConfigError(f"client_cpus must be a whole number of CPUs ≥ 1 on Flower's simulation runtime, "
                          f"got {client_cpus}")
    if verbose is None:
        verbose = os.environ.get("FEDGMA_VERBOSE", "") == "1"
    run_dir = Path(run_dir)
    federation = {
        "num-supernodes": config.data.num_clients,
        "client-resources-num-cpus": int(client_cpus),  # whole CPUs: Flower's simulation config has an integer
        "client-resources-num-gpus": 0.0,
        "init-args-num-cpus": int(num_cpus or os.cpu_count() or 1),
        "init-args-log-to-driver": bool(verbose),
        "init-args-logging-level": "INFO" if verbose else "ERROR",
    }
    with lock_folder(run_dir, "run"):
        _start_run_folder(run_dir, config, overwrite)  # before Flower starts: a refusal costs nothing
        with tempfile.TemporaryDirectory(prefix="fedgma-flower-") as tmp:
            root = Path(tmp)
            app = root / "app"
            app.mkdir()
            for name, text in flower_app_files(config, run_dir, round_timeout, settings).items():
                (app / name).write_text(text)
            superlink = LocalSuperLink(root)
            bar = ProgressBar(config.rounds, progress)
            done = threading.Event()
            follower = threading.Thread(target=_follow_progress, args=(run_dir, bar, done), daemon=True)
            follower.start()
            try:
                with open(run_dir / "flower.log", "w") as flower_log:
                    command = [str(Path(sys.executable).parent / "flwr"), "run", str(app), LocalSuperLink.NAME,
                               "--stream", "--federation-config",
                               " ".join(f"{key}={json.dumps(value)}" for key, value in federation.items())]
                    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=superlink.env, cwd=root, text=True, errors="replace") as stream:
                        assert stream.stdout is not None
                        for line in stream.stdout:
                            flower_log.write(line)
                            if verbose:
                                sys.stdout.write(line)
            finally:
                done.set()
                follower.join(timeout=5)
                bar.close()
                superlink.close()
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        lines = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-40:]
        raise RuntimeError(f"the Flower run ended without writing {summary_path}; the end of "
                           f"{run_dir / 'flower.log'}:\n" + "\n".join(lines))
    return read_json(summary_path)
