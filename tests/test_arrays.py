"""flwr_ext.arrays: the bytes of Flower's np.save, zero-copy reads, copy-free new versions."""

from __future__ import annotations

import gc
import io

import numpy as np
import pytest
from flwr.app import Array

from flwr_ext.arrays import array_to_numpy, npy_empty, numpy_to_array, record_to_numpy
from flwr_ext.asyncfl.aggregate import BLOCK, add_scaled, mix, weighted_delta

CASES = [((3, 4), "float32"), ((), "float64"), ((0, 5), "float16"), ((7,), "int64"),
         ((2, 3, 4), ">f4"), ((BLOCK + 5,), "float32")]  # fmt: skip


def _saved(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(("shape", "dtype"), CASES)
def test_npy_empty_is_sent_as_the_bytes_np_save_writes_without_a_copy(shape, dtype):
    value = npy_empty(shape, dtype)
    value[...] = np.arange(int(np.prod(shape))).reshape(shape).astype(dtype)
    plain = np.array(value)  # an ordinary copy: the reference bytes
    arr = numpy_to_array(value)
    assert arr.data == _saved(plain) == numpy_to_array(plain).data
    assert arr.data is value.base.data  # the array's own memory, not a copy
    np.testing.assert_array_equal(Array.numpy(arr), plain)
    np.testing.assert_array_equal(array_to_numpy(arr), plain)
    # the bytes now belong to the message: the array cannot change them any more
    assert not value.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        value[...] = 0


def test_only_the_whole_array_is_adopted_and_views_keep_the_bytes_alive():
    value = npy_empty((4, 6), np.float32)
    value[...] = 1.5
    view = value.reshape(-1)[2:10]
    part = numpy_to_array(view)  # a slice: copied, and the array stays writable
    assert part.data == _saved(np.array(view))
    assert value.flags.writeable
    del value
    gc.collect()
    np.testing.assert_array_equal(view, np.full(8, 1.5, np.float32))  # still readable


def test_aggregation_results_become_versions_without_a_copy():
    rng = np.random.default_rng(0)
    x = {"w": rng.standard_normal(BLOCK + 3).astype(np.float32), "b": np.ones(3, np.float16)}
    y = {k: v + 1 for k, v in x.items()}
    for out in (mix(x, y, 0.3), add_scaled(x, y, 0.5), weighted_delta([x, y], [0.5, 0.5])):
        for k, v in out.items():
            assert v.dtype == x[k].dtype
            arr = numpy_to_array(v)
            assert arr.data is v.base.data
            assert arr.data == _saved(np.array(v))
            np.testing.assert_array_equal(record_to_numpy({"a": arr})["a"], v)
