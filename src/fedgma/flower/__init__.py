"""Flower integration: GMA as a Flower strategy, and a Flower app that runs fedgma experiments.

Needs the optional extra ``pip install 'fedgma[flower]'`` (flwr 1.41, Message API). ``import fedgma``
never imports flwr; importing this package without flwr raises an ImportError that says what to
install. What is here:

* :mod:`fedgma.flower.strategy`: :class:`FedgmaStrategy`, one Flower strategy made of fedgma's
  parts (any registered aggregator, fedgma's server optimizers, the reply checks of
  :func:`fedgma.round.run_round`), so a Flower run gives the simulator's numbers; ``GMAFedAvg``,
  ``GMAFedAvgM``, ``GMAFedProx``, ``GMAFedAdam``, ``GMAFedYogi``, ``GMAFedAdagrad`` are thin aliases
  of it with GMA and the matching server optimizer.
* :mod:`fedgma.flower.mixin`: ``with_gma(FedAvg | FedAvgM | FedProx | FedAdam | FedYogi |
  FedAdagrad)`` and ``GMAMixin``: GMA in place of the weighted average, then Flower's own server step.
* :mod:`fedgma.flower.app`: the ``server_app`` / ``client_app`` pair that runs a fedgma experiment
  config (datasets, partitions, models) on Flower, the entry points ``fedgma.flower.app:server_app``
  and ``fedgma.flower.app:client_app``; their code is in :mod:`fedgma.flower.server_app` (``serve``,
  the ``FedGMA`` and ``SecureFedGMA`` strategies) and :mod:`fedgma.flower.client_app`, over
  :mod:`fedgma.flower.run_config` (the app's run config as a fedgma ``Config``, what the engine runs)
  and :mod:`fedgma.flower.records` (parameters as Flower records).
* :mod:`fedgma.flower.metrics`: the check of a reply's weight and :func:`aggregate_metrics`, the
  strategies' defensive weighted mean of client metrics.
* :mod:`fedgma.flower.launch`: ``run_flower`` behind ``fedgma run --engine flower`` (a SuperLink of
  its own, then ``flwr run`` of the app).
* :mod:`fedgma.flower.secure`: GMA under Flower's SecAgg+ (``SecureGMA``, the ClientApp's mod).

A SuperLink and SuperNodes on 127.0.0.1 with generated TLS certificates and node keys, for trying a
deployment on one machine and for the deployment test, are in ``examples/flower-app/loopback.py``.
"""

from __future__ import annotations

try:
    import flwr  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "fedgma.flower needs the Flower framework: pip install 'fedgma[flower]' (flwr==1.41.0)"
    ) from error

from fedgma.flower.metrics import aggregate_metrics
from fedgma.flower.strategy import (
    FedgmaStrategy,
    GMAFedAdagrad,
    GMAFedAdam,
    GMAFedAvg,
    GMAFedAvgM,
    GMAFedProx,
    GMAFedYogi,
    GMAMixin,
    InvalidReplyError,
    ReplyAggregator,
    with_gma,
)

__all__ = [
    "FedgmaStrategy",
    "GMAFedAdagrad",
    "GMAFedAdam",
    "GMAFedAvg",
    "GMAFedAvgM",
    "GMAFedProx",
    "GMAFedYogi",
    "GMAMixin",
    "InvalidReplyError",
    "ReplyAggregator",
    "aggregate_metrics",
    "with_gma",
]
