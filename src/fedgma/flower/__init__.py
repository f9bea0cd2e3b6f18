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
  config (datasets, partitions, models) on Flower, and ``run_flower`` behind ``fedgma run --engine flower``.

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
    aggregate_metrics,
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
