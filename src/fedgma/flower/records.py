"""fedgma's values in Flower's records: the flat parameter vector and SCAFFOLD's control variates.

:func:`params_to_record` / :func:`record_to_params` carry the model as an ArrayRecord keyed by
parameter name (the Message API); :func:`params_to_arrays` / :func:`arrays_to_params` as the list of
arrays of legacy Flower ``Parameters`` (SecAgg+'s workflow); the ``SCAFFOLD_*`` keys and
``flat_record`` / ``flat_of`` are how SCAFFOLD's control variates travel between the ServerApp
(:mod:`fedgma.flower.server_app`) and the ClientApp (:mod:`fedgma.flower.client_app`). :class:`Layout`
maps any ArrayRecord (a model fedgma does not know, as :class:`fedgma.flower.strategy.FedgmaStrategy`
receives it) to one flat vector and back, every array in its own dtype and shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import Tensor

from fedgma.models import FlatModel

__all__ = [
    "Layout",
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


@dataclass
class Layout:
    """How a global ArrayRecord maps to one flat vector.

    Attributes:
        keys: every array name, in the record's order.
        dtypes: numpy dtype of each array; shapes: its shape.
        float_keys: the floating-point arrays (in the flat vector, in this order), with ``slices``.
        int_keys: integer and boolean arrays (averaged plainly, outside the vector).
        dtype: the flat vector's torch dtype: float64 if any array is float64, else float32.
    """

    keys: list[str]
    dtypes: dict[str, np.dtype]
    shapes: dict[str, tuple[int, ...]]
    float_keys: list[str]
    int_keys: list[str]
    slices: dict[str, slice] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, arrays: ArrayRecord) -> Layout:
        """The layout of ``arrays``; ValueError for an empty record, an unsupported dtype or no float array."""
        if len(arrays) == 0:
            raise ValueError("the global ArrayRecord is empty: nothing to aggregate")
        dtypes = {key: np.dtype(array.dtype) for key, array in arrays.items()}
        shapes = {key: tuple(array.shape) for key, array in arrays.items()}
        bad = {k: str(d) for k, d in dtypes.items() if d.kind not in "fiub"}
        if bad:
            raise ValueError(f"arrays of dtype {bad} are not supported (floating-point, integer or boolean only)")
        float_keys = [k for k, d in dtypes.items() if d.kind == "f"]
        if not float_keys:
            raise ValueError("the global model has no floating-point array to aggregate")
        slices, start = {}, 0
        for key in float_keys:
            size = int(np.prod(shapes[key], dtype=np.int64))
            slices[key] = slice(start, start + size)
            start += size
        dtype = torch.float64 if any(dtypes[k].itemsize > 4 for k in float_keys) else torch.float32
        return cls(list(arrays), dtypes, shapes, float_keys, [k for k in dtypes if k not in float_keys], slices, dtype)

    @property
    def numel(self) -> int:
        return self.slices[self.float_keys[-1]].stop

    def flatten(self, arrays: ArrayRecord) -> Tensor:
        """The floating-point arrays as one flat vector of ``dtype`` (a copy)."""
        return torch.cat([torch.from_numpy(np.array(arrays[k].numpy(), dtype=np.dtype(str(self.dtype)[6:]),
                                                    copy=True)).reshape(-1) for k in self.float_keys])

    def unflatten(self, flat: Tensor, integers: dict[str, np.ndarray]) -> ArrayRecord:
        """An ArrayRecord with every array in its own dtype and shape, in the global record's order."""
        arrays: dict[str, Array] = {}
        for key in self.keys:
            if key in self.slices:
                values = flat[self.slices[key]].detach().cpu().numpy().astype(self.dtypes[key])
                values = values.reshape(self.shapes[key])
            else:
                values = integers[key]
            arrays[key] = Array(np.array(values, order="C", copy=True))  # (ascontiguousarray makes 0-d arrays 1-d)
        return ArrayRecord(arrays)

    def narrow_limits(self) -> list[tuple[slice, float]]:
        """(slice, largest finite value) of each array narrower than the flat vector (float16 in float32)."""
        width = torch.finfo(self.dtype).bits
        return [(self.slices[k], float(np.finfo(self.dtypes[k]).max)) for k in self.float_keys
                if np.finfo(self.dtypes[k]).bits < width]
