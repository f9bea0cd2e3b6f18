"""Run a ServerApp and a ClientApp on Flower's simulation runtime (Ray) in this process, for the tests.

Not a test module: ``test_examples.py``, ``test_engines.py`` and ``test_hostile_runtime.py`` import it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flwr.app import Context, RecordDict


def simulate(server_app: Any, client_app: Any, num_supernodes: int, run_config: dict[str, Any] | None = None,
             num_cpus: int = 2) -> Context:
    """Run ``server_app`` against ``num_supernodes`` virtual SuperNodes running ``client_app``.

    Node k gets ``partition-id = k`` and ``num-partitions = num_supernodes`` (Flower's simulation
    sets them). Flower logs at WARNING. Returns the ServerApp's Context after the run (its ``state``
    holds what the ServerApp stored there). Raises RuntimeError if the ServerApp raised.
    """
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    saved = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config or {}))
    try:
        result = _run_simulation(
            num_supernodes=num_supernodes, exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app, server_app=server_app, server_app_context=context, backend_name="ray",
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": num_cpus, "log_to_driver": False, "logging_level": "ERROR"}},
        )
    finally:
        flwr_logger.setLevel(saved)
    return result.context
