"""Fast conversions between Flower's ``Array`` / ``ArrayRecord`` and NumPy.

Flower serialises an ``Array`` with ``np.save`` and reads it back with ``np.load``: every read
copies the data and parses the header with ``ast``, every write copies it twice through a
``BytesIO``. The server does this for every reply and every model version, so these helpers do
the same with one copy on write and none on read (a read-only view on the received bytes). The
bytes are identical to Flower's (tested), so either side can read what the other wrote.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"


@lru_cache(maxsize=4096)
def _parse_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """``(shape, fortran_order, dtype)`` of a ``.npy`` header (cached: headers repeat)."""
    buf = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(buf)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(buf)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(buf)
    except ValueError:
        return None
    return None


def _header_length(data: bytes) -> int:
    """Bytes of the magic + header of a ``.npy`` payload (0 if not one)."""
    if len(data) < 12 or data[:6] != b"\x93NUMPY":
        return 0
    if data[6] == 1:
        return 10 + int.from_bytes(data[8:10], "little")
    if data[6] in (2, 3):
        return 12 + int.from_bytes(data[8:12], "little")
    return 0


def array_to_numpy(arr: Array) -> np.ndarray:
    """The ndarray of a Flower ``Array`` without copying (read-only when it is a view).

    Falls back to ``Array.numpy()`` (which raises Flower's own errors) for anything that is not
    a plain C-ordered ``.npy`` payload.
    """
    data = arr.data
    if arr.stype != NUMPY_STYPE or not isinstance(data, bytes):
        return arr.numpy()
    offset = _header_length(data)
    parsed = _parse_header(data[:offset]) if 0 < offset <= 65536 else None
    if parsed is None:
        return arr.numpy()
    shape, fortran, dtype = parsed
    if fortran or dtype.hasobject:
        return arr.numpy()
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        return arr.numpy()  # let Flower raise on a truncated payload
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def numpy_to_array(value: np.ndarray) -> Array:
    """A Flower ``Array`` holding exactly the bytes ``np.save`` would write (one copy)."""
    value = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if value.dtype.hasobject:
        return Array(value)
    head = io.BytesIO()
    header = np.lib.format.header_data_from_array_1_0(value)
    try:
        np.lib.format.write_array_header_1_0(head, header)
    except ValueError:  # header too long for format 1.0: let np.save choose
        return Array(value)
    data = b"".join((head.getvalue(), value.reshape(-1).view(np.uint8) if value.size else b""))
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE, data=data)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord (order kept, no copies)."""
    return {k: array_to_numpy(v) for k, v in record.items()}


def numpy_to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ``params`` (order kept)."""
    return ArrayRecord({k: numpy_to_array(v) for k, v in params.items()})
