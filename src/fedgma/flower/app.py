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
* :class:`FedGMA` aggregates with the core streaming aggregator (via
  :class:`fedgma.flower.strategy.FedgmaStrategy`) and steps with the recipe's own server optimizer
  (``fedgma.server_opt``), on the flat parameter vector;
* evaluation is central, on the server, every ``eval_every`` rounds, with
  :func:`fedgma.evaluation.evaluate_all`.

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

Where each part lives (one idea per module):

* :mod:`fedgma.flower.run_config`: the app's run config as a fedgma Config and the app's own keys,
  what the Flower engine (and secure aggregation) cannot run, the data and model both sides build;
* :mod:`fedgma.flower.records`: the flat parameter vector and SCAFFOLD's control variates as
  Flower records;
* :mod:`fedgma.flower.client_app`: the ClientApp (``client_app``) and its handlers;
* :mod:`fedgma.flower.server_app`: the ServerApp (``server_app``), :func:`serve`, the :class:`FedGMA`
  and :class:`SecureFedGMA` strategies, :func:`discover_clients`;
* :mod:`fedgma.flower.launch`: :func:`run_flower` (``fedgma run --engine flower``), a SuperLink of its
  own and the one-run app's files.

This module is the app's entry point, and stays so: Flower apps name ``fedgma.flower.app:server_app``
and ``fedgma.flower.app:client_app`` (examples/flower-app, :func:`fedgma.flower.launch.flower_app_files`,
deployments), and importing it registers the ClientApp's handlers in every process that loads it
(SuperNodes, the simulation engine's workers). For compatibility it re-exports the names of its
``__all__`` from their new homes, so ``from fedgma.flower.app import run_flower, serve, ...`` keeps working.
"""

from __future__ import annotations

from fedgma.flower.client_app import client_app
from fedgma.flower.launch import run_flower
from fedgma.flower.records import arrays_to_params, params_to_arrays, params_to_record, record_to_params
from fedgma.flower.run_config import (
    EXPERIMENT_KEY,
    SecureSettings,
    check_secure_supported,
    check_supported,
    config_from_run_config,
    secure_settings,
)
from fedgma.flower.server_app import FedGMA, SecureFedGMA, discover_clients, make_server_app, serve, server_app

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

