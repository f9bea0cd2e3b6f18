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

import functools
import json
import math
import os
import time
import uuid
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedgma.client import ClientResult, ScaffoldClient, mean_train_loss, train_client
from fedgma.config import Config, ConfigError, config_to_toml, parse_config, resolve, set_key
from fedgma.data.federated import FederatedDataset, build_federated, hold_out_validation
from fedgma.flower.strategy import FedgmaStrategy, InvalidReplyError, StreamingGrid
from fedgma.models import FlatModel, build_model
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

    The app's own keys are ``run-dir`` (where to write the run folder; empty: nowhere) and
    ``round-timeout`` (seconds to wait for a round's replies).
    """
    raw: dict[str, Any] = {}
    own = {"run-dir": "", "round-timeout": 600.0}
    for key, value in run_config.items():
        if key in own:
            own[key] = value
            continue
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

    def _new_aggregator(self) -> Any:
        return self.new_aggregator()

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
          round_timeout: float = 600.0) -> dict[str, Any]:
    """The ServerApp's work: run ``config`` on the nodes of ``grid``; write the run folder; return the summary.

    The run folder has the files :func:`fedgma.simulation.run` writes (``config.toml``,
    ``partition.json``, ``rounds.jsonl``, ``metrics.jsonl``, ``summary.json`` last,
    ``final_model.pt``), with ``"engine": "flower"`` in the summary.
    """
    from fedgma import simulation

    check_supported(config)
    start_time = time.perf_counter()
    out = Path(run_dir) if run_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)
        (out / "config.toml").write_text(config_to_toml(config))
    if config.threads:
        torch.set_num_threads(config.threads)
    data = build_data(config)
    model = build_flat_model(config, data)
    params = model.params.clone()
    initial = simulation.evaluate_all(model, params, data)
    strategy = FedGMA(config, model)
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
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        torch.save({"round": config.rounds, "params": state.get("final", params).cpu()}, out / "final_model.pt")
    return summary


def make_server_app(config: Config, run_dir: str | Path | None, progress: bool = False,
                    round_timeout: float = 600.0) -> ServerApp:
    """A ServerApp that runs ``config`` (for ``run_simulation`` from Python)."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, config, run_dir, progress, round_timeout)

    return app


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """``flwr run``: the experiment is the app's run config ([tool.flwr.app.config], --run-config)."""
    config, own = config_from_run_config(dict(context.run_config))
    serve(grid, config, own["run-dir"] or None, False, float(own["round-timeout"]))


def run_flower(config: Config, run_dir: str | Path, progress: bool = True, num_cpus: int | None = None,
               client_cpus: float = 1.0, verbose: bool | None = None) -> dict[str, Any]:
    """Run ``config`` on Flower's simulation runtime (Ray), one virtual SuperNode per client; return the summary.

    Writes the same run folder as :func:`fedgma.simulation.run`. ``num_cpus`` caps the CPUs Ray
    may use (default: all), ``client_cpus`` is what one ClientApp reserves. Flower logs at WARNING
    unless ``verbose`` (default: the environment variable ``FEDGMA_VERBOSE=1``).

    Flower 1.41 deprecates the Python ``run_simulation`` wrapper in favour of ``flwr run`` (what
    ``examples/flower-app`` does); this in-process engine calls the simulation runtime that both
    use, ``flwr.simulation.run_simulation._run_simulation``, without the deprecated wrapper.

    Raises:
        ConfigError: a setting the Flower engine does not run. RuntimeError: the run ended without a summary.
    """
    import logging

    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    check_supported(config)
    if verbose is None:
        verbose = os.environ.get("FEDGMA_VERBOSE", "") == "1"
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    flwr_logger.setLevel(logging.INFO if verbose else logging.WARNING)
    backend_config = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": num_cpus or os.cpu_count() or 1, "log_to_driver": bool(verbose),
                      "logging_level": "INFO" if verbose else "ERROR"},
    }
    try:
        _run_simulation(
            num_supernodes=config.data.num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=make_server_app(config, run_dir, progress),
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        flwr_logger.setLevel(saved_level)
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
