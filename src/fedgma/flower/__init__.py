"""Flower integration: GMA as a Flower strategy, and a Flower app that runs fedgma experiments.

Needs the optional extra ``pip install 'fedgma[flower]'`` (flwr 1.41, Message API). ``import fedgma``
never imports flwr; importing this package without flwr raises an ImportError that says what to
install. What is here:

* :mod:`fedgma.flower.strategy`: ``GMAMixin`` puts Gradient Masked Averaging (Tenison et al., TMLR
  2023) in place of the weighted average of any Flower ``FedAvg``-family strategy, using the core
  library's streaming :class:`~fedgma.aggregation.GMAAggregator` (one implementation of the maths);
  ready-made ``GMAFedAvg``, ``GMAFedAvgM``, ``GMAFedProx``, ``GMAFedAdam``, ``GMAFedYogi``,
  ``GMAFedAdagrad``, and ``with_gma(AnyFedAvgSubclass)``.
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
    "GMAFedAdagrad",
    "GMAFedAdam",
    "GMAFedAvg",
    "GMAFedAvgM",
    "GMAFedProx",
    "GMAFedYogi",
    "GMAMixin",
    "InvalidReplyError",
    "ReplyAggregator",
    "with_gma",
]
