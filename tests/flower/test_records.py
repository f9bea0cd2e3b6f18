"""fedgma.flower.records: Layout, any ArrayRecord as one flat vector and back, each array in its own dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord  # noqa: E402

from fedgma.flower.records import Layout  # noqa: E402

pytestmark = pytest.mark.flower


def _record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_float_arrays_make_the_flat_vector_in_order_and_come_back_with_their_dtypes_and_shapes():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    steps = np.array(7, dtype=np.int64)
    h = np.array([0.5, -1.0], dtype=np.float16)
    record = _record(w=w, steps=steps, h=h)
    layout = Layout.of(record)
    assert layout.keys == ["w", "steps", "h"] and layout.float_keys == ["w", "h"] and layout.int_keys == ["steps"]
    assert layout.dtype == torch.float32 and layout.numel == 8
    flat = layout.flatten(record)
    assert flat.dtype == torch.float32 and flat.tolist() == [0, 1, 2, 3, 4, 5, 0.5, -1.0]
    back = layout.unflatten(flat, {"steps": steps})
    assert list(back) == ["w", "steps", "h"]
    for key, array in (("w", w), ("steps", steps), ("h", h)):
        assert back[key].numpy().dtype == array.dtype and back[key].numpy().shape == array.shape
        assert np.array_equal(back[key].numpy(), array)
    assert layout.narrow_limits() == [(slice(6, 8), 65504.0)]  # float16 in a float32 vector


def test_a_float64_array_makes_the_vector_float64():
    layout = Layout.of(_record(a=np.zeros(2, np.float32), b=np.zeros(3, np.float64)))
    assert layout.dtype == torch.float64 and layout.narrow_limits() == [(slice(0, 2), float(np.finfo(np.float32).max))]


@pytest.mark.parametrize(("arrays", "message"), [
    ({}, "the global ArrayRecord is empty: nothing to aggregate"),
    ({"n": np.zeros(2, np.int32)}, "the global model has no floating-point array to aggregate"),
    ({"c": np.zeros(2, np.complex64)}, "arrays of dtype {'c': 'complex64'} are not supported"),
])
def test_records_that_cannot_be_aggregated_are_refused_with_the_reason(arrays, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{")):
        Layout.of(_record(**arrays))
