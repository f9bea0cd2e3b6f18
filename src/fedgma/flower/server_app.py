"""fedgma's ServerApp: ``server_app`` (entry point ``fedgma.flower.app:server_app``) and what it runs.

:func:`serve` runs an experiment config on the nodes of a Flower ``Grid`` and writes the run folder
that :func:`fedgma.simulation.run` writes: plaintext rounds with the :class:`FedGMA` strategy
(fedgma's client sampling, aggregators and server optimizers; SCAFFOLD's c with
:class:`ServerScaffold`), or, with ``secure-aggregation = true``, rounds under Flower's SecAgg+ with
:class:`SecureFedGMA`. :func:`discover_clients` learns which node holds which client;
:func:`make_server_app` wraps :func:`serve` for one config (tests), and ``server_app`` reads the
experiment from the app's run config (:func:`fedgma.flower.run_config.config_from_run_config`).
"""

from __future__ import annotations

import io
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from torch import Tensor

from fedgma.checkpoint import atomic_write, lock_folder, record_failure
from fedgma.client import ClientResult, ScaffoldClient, mean_train_loss
from fedgma.config import Config, config_to_toml
from fedgma.evaluation import evaluate_all
from fedgma.flower.records import (
    SCAFFOLD_C,
    SCAFFOLD_COMMITTED,
    SCAFFOLD_RUN,
    arrays_to_params,
    flat_record,
    params_to_arrays,
    params_to_record,
    record_to_params,
)
from fedgma.flower.run_config import (
    EXPERIMENT_KEY,
    PARTITION_KEY,
    SecureSettings,
    build_data,
    build_flat_model,
    check_secure_supported,
    check_supported,
    config_from_run_config,
    secure_settings,
)
from fedgma.flower.secure import SecureGMA, run_secure
from fedgma.flower.strategy import FedgmaStrategy, InvalidReplyError, StreamingGrid
from fedgma.models import FlatModel
from fedgma.simulation import local_settings, sample_clients

__all__ = [
    "FedGMA",
    "SecureFedGMA",
    "ServerScaffold",
    "discover_clients",
    "make_server_app",
    "serve",
    "server_app",
]


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
        control = flat_record(self.state.client_algorithm.server_control) if self.scaffold else None
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
    message, answered by fedgma's ClientApp, :mod:`fedgma.flower.client_app`, with its ``partition-id``);
    ``{client id: node id}``.

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
    caller already holds it, as :func:`~fedgma.flower.launch.run_flower` does), and a folder holding a finished run of
    another config is refused (:class:`~fedgma.checkpoint.RunFolderError`) unless ``overwrite``. Once the
    folder is this run's, any error is re-raised after its traceback is written to ``error.txt`` there
    (``flwr run`` exits 0 whatever the ServerApp raised; ``fedgma report`` lists the folder as failed).
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


def start_run_folder(out: Path, config: Config, overwrite: bool) -> None:
    """Refuse a folder holding another config's results (unless ``overwrite``); clear an old run's files."""
    from fedgma import simulation

    if not overwrite:
        simulation._refuse_another_config(out, config)
    simulation._clear_run(out)


def _serve(grid: Grid, config: Config, out: Path | None, progress: bool, round_timeout: float,
           overwrite: bool, strategy_options: dict[str, Any], secure: SecureSettings | None = None) -> dict[str, Any]:
    """Check what the engine can run, claim the run folder, then :func:`_run`. Once the folder is this run's,
    a failure leaves its traceback there (``error.txt``, :func:`fedgma.checkpoint.record_failure`, as a failed
    sweep run's): ``flwr run`` exits 0 whatever the ServerApp raised (flwr 1.41), so the folder is where a
    failure shows."""
    check_supported(config)
    if secure is not None:
        check_secure_supported(config)
        secure.check_clients_per_round(config.server.clients_per_round)
    start_time = time.perf_counter()
    if out is None:
        return _run(grid, config, out, progress, round_timeout, strategy_options, secure, start_time)
    out.mkdir(parents=True, exist_ok=True)
    start_run_folder(out, config, overwrite)
    try:
        atomic_write(out / "config.toml", config_to_toml(config).encode())
        return _run(grid, config, out, progress, round_timeout, strategy_options, secure, start_time)
    except Exception:
        record_failure(out)
        raise


def _run(grid: Grid, config: Config, out: Path | None, progress: bool, round_timeout: float,
         strategy_options: dict[str, Any], secure: SecureSettings | None, start_time: float) -> dict[str, Any]:
    """The run itself, in a claimed folder (or none): the rounds, their logs, the final files."""
    from fedgma import simulation

    if config.threads:
        torch.set_num_threads(config.threads)
    data = build_data(config)
    model = build_flat_model(config, data)
    params = model.params.clone()
    initial = evaluate_all(model, params, data)
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
        record = {"round": server_round, **evaluate_all(model, now, data)}
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
        # no aggregate_fit for this round: SecAgg+ stopped it before unmasking, so no client's vector is in a
        # sum, the survivors' included (too few clients were left to reach the reconstruction threshold)
        halted = not last
        why = ("not in a secure sum: SecAgg+ halted the round (too few clients left to unmask it)" if halted
               else "not in the secure sum (dropped out of SecAgg+)")
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
            **({"lost": {str(client): why for client in lost}} if lost else {}),
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
