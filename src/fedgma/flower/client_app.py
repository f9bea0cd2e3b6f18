"""fedgma's ClientApp: ``client_app``, what a SuperNode runs (entry point ``fedgma.flower.app:client_app``).

The node with ``partition-id`` k (its node config) is client k of the experiment config that each
message carries (``EXPERIMENT_KEY``); it builds the config's data and model once per config
(``_client_for``) and answers three kinds of message: ``query`` (which client it is), ``train``
(local training with :func:`fedgma.client.train_client` and the generator
``torch_generator(seed, "client", round, k)``; SCAFFOLD's c_i kept in the node's Context state;
under SecAgg+ a legacy FitIns, its reply masked by :func:`fedgma.flower.secure.fedgma_secaggplus_mod`)
and ``evaluate`` (loss and accuracy on its partition).

The decorators that register the handlers on ``client_app`` run when this module is imported, which
importing :mod:`fedgma.flower.app` does.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import tomllib
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from torch import Tensor

from fedgma.client import ClientResult, train_client
from fedgma.config import parse_config, resolve
from fedgma.evaluation import evaluate
from fedgma.flower.records import (
    SCAFFOLD_C,
    SCAFFOLD_CI,
    SCAFFOLD_COMMITTED,
    SCAFFOLD_META,
    SCAFFOLD_PENDING,
    SCAFFOLD_RUN,
    arrays_to_params,
    flat_of,
    flat_record,
    params_to_arrays,
    params_to_record,
    record_to_params,
)
from fedgma.flower.run_config import EXPERIMENT_KEY, PARTITION_KEY, build_data, build_flat_model
from fedgma.flower.secure import fedgma_secaggplus_mod
from fedgma.seeding import torch_generator
from fedgma.simulation import local_settings

__all__ = ["client_app"]


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
        return flat_of(state.array_records[SCAFFOLD_CI], numel)
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
        server_control = flat_of(scaffold_c, client.model.numel)
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
        context.state[SCAFFOLD_PENDING] = flat_record(pending)
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
