"""fedgma: federated learning with Gradient Masked Averaging (Tenison et al., TMLR 2023).

The pieces compose by configuration: an aggregation rule (:mod:`fedgma.aggregation`), a server
optimizer (:mod:`fedgma.server_opt`) and a client algorithm (:mod:`fedgma.client`), run by the
simulator (:mod:`fedgma.simulation`) on partitioned data (:mod:`fedgma.data`).
"""

from importlib.metadata import PackageNotFoundError, version

from fedgma.aggregation import GMAAggregator, MeanAggregator, gma, make_aggregator, mean

try:
    __version__ = version("fedgma")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["GMAAggregator", "MeanAggregator", "__version__", "gma", "make_aggregator", "mean"]
