"""Data: loaders registered by name (``datasets`` and one module per loader), partitioners
(``partition`` for the maths, ``partitioners`` for the registry) and the federated view (``federated``)."""

from fedgma.data.arrays import ArrayDataset, DatasetSplits
from fedgma.data.datasets import DatasetError, available_datasets, load_dataset

__all__ = ["ArrayDataset", "DatasetError", "DatasetSplits", "available_datasets", "load_dataset"]
