"""fedgma: federated learning with Gradient Masked Averaging (Tenison et al., TMLR 2023).

The pieces compose by configuration: an aggregation rule (:mod:`fedgma.aggregation`), a server
optimizer (:mod:`fedgma.server_opt`) and a client algorithm (:mod:`fedgma.client`), run by the
simulator (:mod:`fedgma.simulation`) on partitioned data (:mod:`fedgma.data`).

The names below are imported on first use (PEP 562), so that ``import fedgma`` and the command
line's ``--help`` and ``--version`` do not import torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("fedgma")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY = {
    "GMAAggregator": "fedgma.aggregation",
    "MeanAggregator": "fedgma.aggregation",
    "gma": "fedgma.aggregation",
    "make_aggregator": "fedgma.aggregation",
    "mean": "fedgma.aggregation",
    "gma_state_dicts": "fedgma.state_dicts",
}

__all__ = ["GMAAggregator", "MeanAggregator", "__version__", "gma", "gma_state_dicts", "make_aggregator", "mean"]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from fedgma.aggregation import GMAAggregator, MeanAggregator, gma, make_aggregator, mean
    from fedgma.state_dicts import gma_state_dicts


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fedgma' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
