"""Fast conversions between Flower's ``Array`` / ``ArrayRecord`` and NumPy.

Flower serialises an ``Array`` with ``np.save`` and reads it back with ``np.load``: every read
copies the data and parses the header with ``ast``, every write copies it twice through a
``BytesIO``. The server does this for every reply and every model version, so these helpers do
the same with one copy on write and none on read (a read-only view on the received bytes). The
bytes are identical to Flower's (tested), so either side can read what the other wrote.

A new model version need not be copied at all: :func:`npy_empty` returns a writable array that
lives inside a fresh ``bytes`` object, right after its ``.npy`` header; the aggregation writes
the model there and :func:`numpy_to_array` hands those very bytes to the ``Array`` (and makes
the array read-only, since the bytes are now the message's). A ``bytes`` object may be written
only while nobody else holds it, just after ``PyBytes_FromStringAndSize(NULL, n)`` created it:
the CPython C API allows exactly that, and it is the only case used here. On other Pythons
:func:`npy_empty` is ``np.empty`` (one copy on write, as before).
"""

from __future__ import annotations

import ctypes
import io
import platform
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"

if platform.python_implementation() == "CPython":
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    _bytes_address = ctypes.pythonapi.PyBytes_AsString
    _bytes_address.restype = ctypes.c_void_p
    _bytes_address.argtypes = (ctypes.py_object,)
else:  # pragma: no cover
    _new_bytes = None


@lru_cache(maxsize=4096)
def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes | None:
    """The ``.npy`` 1.0 header ``np.save`` writes for a C-ordered array (``None``: too long)."""
    head = io.BytesIO()
    d = {"shape": shape, "fortran_order": False, "descr": np.lib.format.dtype_to_descr(dtype)}
    try:
        np.lib.format.write_array_header_1_0(head, d)
    except ValueError:  # header too long for format 1.0: np.save would choose
        return None
    return head.getvalue()


class _NpyBytes:
    """Owner of an :func:`npy_empty` array: the ``bytes`` (header + data) it lives in.

    NumPy keeps this object as the ``base`` of the array and of every view of it, so the bytes
    live as long as any of them.
    """

    __slots__ = ("__array_interface__", "data", "header", "shape", "dtype")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, header: bytes) -> None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self.data: bytes = _new_bytes(None, len(header) + nbytes)
        address = _bytes_address(self.data)
        ctypes.memmove(address, header, len(header))
        self.header, self.shape, self.dtype = header, shape, dtype
        self.__array_interface__ = {
            "version": 3,
            "shape": shape,
            "typestr": dtype.str,
            "data": (address + len(header), False),
        }

    def owns(self, value: np.ndarray) -> bool:
        """Whether ``value`` is the whole array stored in these bytes."""
        return (
            value.shape == self.shape
            and value.dtype == self.dtype
            and value.flags.c_contiguous
            and value.__array_interface__["data"][0] == self.__array_interface__["data"][0]
        )


def npy_empty(shape: tuple[int, ...], dtype: np.dtype | str) -> np.ndarray:
    """An uninitialised, writable array that :func:`numpy_to_array` sends without a copy.

    Its memory is the data part of a fresh ``bytes`` object laid out as ``np.save`` writes it.
    Falls back to ``np.empty`` where that is not possible.
    """
    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    header = _npy_header(shape, dtype) if _new_bytes is not None and not dtype.hasobject else None
    if header is None:
        return np.empty(shape, dtype)
    return np.asarray(_NpyBytes(shape, dtype, header))


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
    """A Flower ``Array`` holding exactly the bytes ``np.save`` would write.

    One copy; none for an array made by :func:`npy_empty`, which becomes read-only here (its
    bytes now belong to the ``Array``).
    """
    owner = getattr(value, "base", None)
    if isinstance(owner, _NpyBytes) and owner.owns(value):
        value.flags.writeable = False
        return Array(
            dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE, data=owner.data
        )
    value = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    if value.dtype.hasobject:
        return Array(value)
    header = _npy_header(tuple(value.shape), value.dtype)
    if header is None:  # header too long for format 1.0: let np.save choose
        return Array(value)
    data = b"".join((header, value.reshape(-1).view(np.uint8) if value.size else b""))
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE, data=data)


def record_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """``{name: ndarray}`` of an ArrayRecord (order kept, no copies)."""
    return {k: array_to_numpy(v) for k, v in record.items()}


def numpy_to_record(params: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ``params`` (order kept)."""
    return ArrayRecord({k: numpy_to_array(v) for k, v in params.items()})
