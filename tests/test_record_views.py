"""The server's zero-copy decoding of updates reads exactly what ``np.load`` reads."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fed_iotlm.federation.records import record_to_numpy, record_views


def test_views_equal_np_load_for_every_layout():
    rng = np.random.default_rng(0)
    arrays = {
        "c_order": rng.standard_normal((3, 4)).astype(np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((5, 2))),
        "ints": np.arange(7, dtype=np.int64),
        "scalar": np.array(3.0, np.float32),
        "empty": np.zeros((0, 3), np.float16),
    }
    record = ArrayRecord({k: Array(v) for k, v in arrays.items()})
    views, loaded = record_views(record), record_to_numpy(record)
    for key, value in arrays.items():
        assert views[key].dtype == loaded[key].dtype == value.dtype
        assert views[key].shape == value.shape
        np.testing.assert_array_equal(views[key], value)
        assert not views[key].flags.writeable  # a view onto the message, never written


def test_object_arrays_are_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a pickle inside
    array = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buf.getvalue())
    with pytest.raises(ValueError, match="object"):
        record_views(ArrayRecord({"x": array}))
