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
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import tomllib
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedgma.checkpoint import atomic_write, lock_folder, read_json
from fedgma.client import ClientResult, ScaffoldClient, mean_train_loss, train_client
from fedgma.config import Config, ConfigError, config_to_toml, parse_config, resolve, set_key
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.flower.strategy import FedgmaStrategy, InvalidReplyError, StreamingGrid
from fedgma.models import FlatModel, build_model
from fedgma.progress import ProgressBar
from fedgma.seeding import torch_generator
from fedgma.simulation import evaluate, local_settings, sample_clients

__all__ = [
    "EXPERIMENT_KEY",
    "FedGMA",
    "check_supported",
    "client_app",
    "config_from_run_config",
    "make_server_app",
    "params_to_record",
    "record_to_params",
    "run_flower",
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


def config_from_run_config(run_config: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """A resolved Config from a Flower run config (the experiment keys, dotted), and the app's own keys.

    The app's own keys are ``run-dir`` (where to write the run folder; empty: nowhere),
    ``round-timeout`` (seconds to wait for a round's replies), ``overwrite`` (replace a finished run
    of another config in ``run-dir``), ``run-dir-locked`` (the process that started the run holds the
    run folder's lock: :func:`run_flower`), ``pull-interval`` / ``max-pull-interval`` (seconds between
    pulls of replies, see :class:`FedgmaStrategy`) and ``fedgma-config`` (a whole experiment config as TOML,
    which the dotted keys, if any, then override).
    """
    own: dict[str, Any] = {"run-dir": "", "round-timeout": 600.0, "overwrite": False, "run-dir-locked": False,
                           "pull-interval": 0.1, "max-pull-interval": 2.0, EXPERIMENT_KEY: ""}
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


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    """Local training of this node's client from the received global model (fedgma.client.train_client)."""
    config_record = msg.content["config"]
    client = _client_for(str(config_record[EXPERIMENT_KEY]))
    client_id = _partition_id(context)
    expected = config_record.get("client-id")
    if expected is not None and int(expected) != client_id:
        raise ValueError(f"message for client {expected} reached the node of client {client_id}")
    if not 0 <= client_id < client.data.num_clients:
        raise ValueError(f"partition-id {client_id} is outside the config's {client.data.num_clients} clients")
    params = record_to_params(msg.content["arrays"], client.model)
    round_index = int(config_record["server-round"])
    seed = client.config.seed
    correction = control = server_control = None
    if SCAFFOLD_C in msg.content.array_records:  # SCAFFOLD: gradient correction c − c_i
        server_control = _flat_of(msg.content.array_records[SCAFFOLD_C], client.model.numel)
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
    metrics = MetricRecord({
        "num-examples": int(result.num_samples),
        "train_loss": float(result.train_loss),
        "num-steps": int(result.num_steps),
        "client-id": int(client_id),
    })
    arrays = params_to_record(client.model, params + result.update)
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


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
        """Which node holds which client: wait for the nodes, then ask each (a Flower "query" message)."""
        num_clients = self.config.data.num_clients
        deadline = time.monotonic() + self.connect_timeout
        while len(nodes := list(grid.get_node_ids())) < num_clients:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of {num_clients} SuperNodes connected in {self.connect_timeout} s"
                )
            time.sleep(0.5)
        messages = [
            Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=MessageType.QUERY)
            for node in nodes
        ]
        replies = StreamingGrid(grid, self.pull_interval).send_and_receive(messages, timeout=self.connect_timeout)
        mapping: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                log(WARNING, "node %s did not say which client it is: %s",
                    reply.metadata.src_node_id, reply.error.reason)
                continue
            client_id = int(reply.content["metrics"][PARTITION_KEY])
            if client_id in mapping:
                raise ValueError(
                    f"nodes {mapping[client_id]} and {reply.metadata.src_node_id} both hold client {client_id}"
                )
            mapping[client_id] = int(reply.metadata.src_node_id)
        missing = sorted(set(range(num_clients)) - set(mapping))
        if missing:
            raise ValueError(
                f"no connected SuperNode holds client(s) {missing[:10]} (partition-id in 0..{num_clients - 1})"
            )
        log(INFO, "fedgma: %d clients mapped to SuperNodes", len(mapping))
        return mapping

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
          **strategy_options: Any) -> dict[str, Any]:
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
    """
    out = Path(run_dir) if run_dir else None
    if out is None or not lock:
        return _serve(grid, config, out, progress, round_timeout, overwrite, strategy_options)
    with lock_folder(out, "run"):
        return _serve(grid, config, out, progress, round_timeout, overwrite, strategy_options)


def _start_run_folder(out: Path, config: Config, overwrite: bool) -> None:
    """Refuse a folder holding another config's results (unless ``overwrite``); clear an old run's files."""
    from fedgma import simulation

    if not overwrite:
        simulation._refuse_another_config(out, config)
    simulation._clear_run(out)


def _serve(grid: Grid, config: Config, out: Path | None, progress: bool, round_timeout: float,
           overwrite: bool, strategy_options: dict[str, Any]) -> dict[str, Any]:
    from fedgma import simulation

    check_supported(config)
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
    strategy = FedGMA(config, model, **strategy_options)
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
        write("rounds", round_record)
        state["round_start"] = time.perf_counter()
        if server_round % config.eval_every and server_round != config.rounds:
            bar.update(server_round)
            return None
        current = record_to_params(arrays, model)
        record = {
            "round": server_round,
            **simulation.evaluate_all(model, current, data),
            "train_loss": round_record["train_loss"],
            "total_local_steps": state["total_steps"],
            **{k: v for k, v in stats.items() if isinstance(v, float)},
            "elapsed_s": time.perf_counter() - start_time,
        }
        write("metrics", record)
        history.append(record)
        bar.update(server_round, record)
        if server_round == config.rounds:
            state["final"] = current
        return MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float)) and "/" not in k})

    try:
        strategy.start(grid, params_to_record(model, params), num_rounds=config.rounds, timeout=round_timeout,
                       train_config=ConfigRecord(), evaluate_fn=after_round)
    finally:
        bar.close()
        for handle in logs.values():
            handle.close()
    summary = simulation.summarize(config, history, state["total_steps"], time.perf_counter() - start_time)
    summary["initial"] = initial
    summary["engine"] = "flower"
    if out is not None:
        model_bytes = io.BytesIO()
        torch.save({"round": config.rounds, "params": state.get("final", params).cpu()}, model_bytes)
        atomic_write(out / "final_model.pt", model_bytes.getvalue())
        atomic_write(out / "summary.json", json.dumps(summary, indent=2).encode())  # last: the "finished" mark
    return summary


def make_server_app(config: Config, run_dir: str | Path | None, progress: bool = False,
                    round_timeout: float = 600.0, overwrite: bool = False, lock: bool = True) -> ServerApp:
    """A ServerApp that runs ``config`` (:func:`serve`), for running in this process (tests)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, config, run_dir, progress, round_timeout, overwrite, lock)

    return app


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """``flwr run``: the experiment is the app's run config ([tool.flwr.app.config], --run-config)."""
    config, own = config_from_run_config(dict(context.run_config))
    serve(grid, config, own["run-dir"] or None, False, float(own["round-timeout"]), bool(own["overwrite"]),
          not own["run-dir-locked"], pull_interval=float(own["pull-interval"]),
          max_pull_interval=float(own["max-pull-interval"]))


# --------------------------------------------------------------------------------------------
# fedgma run --engine flower: `flwr run` against a SuperLink of its own
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flower_app_files(config: Config, run_dir: Path, round_timeout: float = 600.0) -> dict[str, str]:
    """The files of a one-run Flower app (its ``pyproject.toml``): fedgma's ServerApp and ClientApp, and
    the experiment as the app's run config (the resolved config as TOML under ``fedgma-config``)."""
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
                       "pull-interval": 0.005, "max-pull-interval": 0.01},
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
               round_timeout: float = 600.0) -> dict[str, Any]:
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

    Raises:
        ConfigError: a setting the Flower engine does not run. FolderInUseError, RunFolderError: see above.
        RuntimeError: the run ended without a summary (with the end of Flower's log).
    """
    check_supported(config)
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
            for name, text in flower_app_files(config, run_dir, round_timeout).items():
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
