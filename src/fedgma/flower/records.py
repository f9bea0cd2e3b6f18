"""fedgma's values in Flower's records: the flat parameter vector and SCAFFOLD's control variates.

:func:`params_to_record` / :func:`record_to_params` carry the model as an ArrayRecord keyed by
parameter name (the Message API); :func:`params_to_arrays` / :func:`arrays_to_params` as the list of
arrays of legacy Flower ``Parameters`` (SecAgg+'s workflow); the ``SCAFFOLD_*`` keys and
``flat_record`` / ``flat_of`` are how SCAFFOLD's control variates travel between the ServerApp
(:mod:`fedgma.flower.server_app`) and the ClientApp (:mod:`fedgma.flower.client_app`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from fedgma.models import FlatModel

__all__ = [
    "SCAFFOLD_C",
    "SCAFFOLD_CI",
    "SCAFFOLD_COMMITTED",
    "SCAFFOLD_META",
    "SCAFFOLD_PENDING",
    "SCAFFOLD_RUN",
    "arrays_to_params",
    "flat_of",
    "flat_record",
    "params_to_arrays",
    "params_to_record",
    "record_to_params",
]


def params_to_record(model: FlatModel, params: Tensor) -> ArrayRecord:
    """A flat parameter vector as an ArrayRecord keyed by parameter name, with the parameters' shapes."""
    shapes = {name: tuple(p.shape) for name, p in model.module.named_parameters()}
    return ArrayRecord({
        layer.name: Array(params[layer.start : layer.start + layer.numel].detach().cpu().reshape(shapes[layer.name])
                          .numpy().copy())
        for layer in model.layers
    })


def record_to_params(record: ArrayRecord, model: FlatModel) -> Tensor:
    """The flat parameter vector of an ArrayRecord made by :func:`params_to_record` (checked)."""
    names = [layer.name for layer in model.layers]
    if set(record) != set(names):
        raise ValueError(f"the model arrays {sorted(record)} do not match the model's parameters {names}")
    parts = []
    for layer in model.layers:
        values = record[layer.name].numpy().reshape(-1)
        if values.size != layer.numel:
            raise ValueError(f"array {layer.name!r} has {values.size} values, the model expects {layer.numel}")
        parts.append(torch.from_numpy(values.astype(np.float32, copy=False)))
    return torch.cat(parts)


def params_to_arrays(model: FlatModel, params: Tensor) -> list[np.ndarray]:
    """A flat parameter vector as the list of the parameters' float32 arrays, in parameter order (legacy
    Flower ``Parameters``, as SecAgg+'s workflow sends them)."""
    return [array.numpy() for array in params_to_record(model, params).values()]


def arrays_to_params(arrays: list[np.ndarray], model: FlatModel) -> Tensor:
    """The flat parameter vector of :func:`params_to_arrays`' list (checked: count and sizes).

    Raises:
        ValueError: a number of arrays other than the model's parameters, or an array of the wrong size.
    """
    names = [layer.name for layer in model.layers]
    if len(arrays) != len(names):
        raise ValueError(f"got {len(arrays)} arrays, the model has {len(names)} parameters {names}")
    return record_to_params(ArrayRecord({name: Array(np.asarray(a)) for name, a in zip(names, arrays, strict=True)}),
                            model)


# SCAFFOLD on Flower. The server sends c (ArrayRecord SCAFFOLD_C), its run's token (SCAFFOLD_RUN) and
# the last round in which this client's reply was committed (SCAFFOLD_COMMITTED); the client keeps its
# c_i in its Context state (SCAFFOLD_CI) and the c_i⁺ of its latest reply as pending (SCAFFOLD_PENDING,
# its round and the token in SCAFFOLD_META), which becomes its c_i only once the server says that
# reply was committed: a dropped reply or a skipped round leaves c_i as it was, as on the simulator.
# A different token (another experiment in the same Flower run) starts from c_i = 0.
SCAFFOLD_C = "scaffold-c"
SCAFFOLD_RUN = "scaffold-run"
SCAFFOLD_COMMITTED = "scaffold-committed-round"
SCAFFOLD_CI = "scaffold-ci"
SCAFFOLD_PENDING = "scaffold-pending"
SCAFFOLD_META = "scaffold-meta"


def flat_record(values: Tensor) -> ArrayRecord:
    return ArrayRecord({"values": Array(values.detach().cpu().numpy().copy())})


def flat_of(record: ArrayRecord, numel: int) -> Tensor:
    values = np.asarray(record["values"].numpy(), dtype=np.float32).reshape(-1)
    if values.size != numel:
        raise ValueError(f"a SCAFFOLD control variate has {values.size} values, the model {numel}")
    return torch.from_numpy(values.copy())
