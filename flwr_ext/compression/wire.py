"""Byte-level reader and writer of the ``flwr-ext`` compressed wire format.

The :class:`Reader` checks every read against the bytes that are actually left, and every
declared count against a caller-given bound, *before* anything is allocated: a payload that lies
about a size raises :class:`~flwr_ext.compression.errors.CorruptPayloadError` instead of
allocating. Integers are unsigned LEB128 varints; floats are little-endian IEEE 754.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import CorruptPayloadError

MAGIC = b"FX"
VERSION = 2
#: Versions this decoder reads. v2 adds symbol-stream mode 3 (long byte-sized streams as zstd);
#: v1 payloads never use it, so they decode unchanged.
SUPPORTED_VERSIONS = (1, 2)

#: dtype codes on the wire (one byte). Index = code.
DTYPES: tuple[str, ...] = (
    "float32",
    "float64",
    "float16",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "bool",
)
DTYPE_CODE = {name: i for i, name in enumerate(DTYPES)}
MAX_NDIM = 8
_MAX_VARINT_BYTES = 10


class Writer:
    """Append-only byte buffer."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, value: int) -> None:
        """Write one unsigned byte."""
        self._parts.append(bytes((value,)))

    def varint(self, value: int) -> None:
        """Write an unsigned LEB128 integer."""
        if value < 0:
            raise ValueError("varint must be non-negative")
        out = bytearray()
        while True:
            byte = value & 0x7F
            value >>= 7
            if value:
                out.append(byte | 0x80)
            else:
                out.append(byte)
                break
        self._parts.append(bytes(out))

    def varints(self, values: np.ndarray) -> None:
        """Write a sequence of varints (small tables only)."""
        for v in values.tolist():
            self.varint(int(v))

    def f32(self, value: float) -> None:
        """Write a little-endian float32."""
        self._parts.append(struct.pack("<f", value))

    def raw(self, data: bytes) -> None:
        """Write bytes as they are."""
        self._parts.append(bytes(data))

    def array(self, arr: np.ndarray) -> None:
        """Write the little-endian bytes of a numeric array (no length prefix)."""
        self._parts.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())

    def blob(self, data: bytes) -> None:
        """Write a varint length then the bytes."""
        self.varint(len(data))
        self.raw(data)

    def getvalue(self) -> bytes:
        """Return everything written so far."""
        return b"".join(self._parts)


class Reader:
    """Bounds-checked reader over an immutable payload."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = memoryview(data).cast("B")
        self._pos = 0

    @property
    def remaining(self) -> int:
        """Number of unread bytes."""
        return len(self._buf) - self._pos

    def _take(self, n: int) -> memoryview:
        if n < 0 or n > self.remaining:
            raise CorruptPayloadError(
                f"truncated payload: need {n} bytes at offset {self._pos}, {self.remaining} left"
            )
        view = self._buf[self._pos : self._pos + n]
        self._pos += n
        return view

    def u8(self) -> int:
        """Read one unsigned byte."""
        return int(self._take(1)[0])

    def varint(self, max_value: int, what: str = "value") -> int:
        """Read an unsigned LEB128 integer and check ``value <= max_value``."""
        result = 0
        for i in range(_MAX_VARINT_BYTES):
            byte = self.u8()
            result |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if result > max_value:
                    raise CorruptPayloadError(f"{what} {result} exceeds bound {max_value}")
                return result
        raise CorruptPayloadError(f"varint for {what} too long")

    def f32(self) -> float:
        """Read a little-endian float32."""
        return float(struct.unpack("<f", self._take(4))[0])

    def raw(self, n: int) -> bytes:
        """Read exactly ``n`` bytes."""
        return bytes(self._take(n))

    def raw_view(self, n: int) -> memoryview:
        """Read exactly ``n`` bytes as a view of the payload (no copy)."""
        return self._take(n)

    def array(self, dtype: str, count: int) -> np.ndarray:
        """Read ``count`` little-endian items of ``dtype`` (checked before allocation)."""
        dt = np.dtype(dtype).newbyteorder("<")
        view = self._take(count * dt.itemsize)
        return np.frombuffer(view, dtype=dt).astype(dt.newbyteorder("="), copy=True)

    def blob(self, max_len: int, what: str = "blob") -> bytes:
        """Read a varint length (bounded by the bytes left and ``max_len``) then the bytes."""
        n = self.varint(min(max_len, self.remaining), what)
        return self.raw(n)

    def blob_view(self, max_len: int, what: str = "blob") -> memoryview:
        """:meth:`blob` as a view of the payload (no copy)."""
        n = self.varint(min(max_len, self.remaining), what)
        return self._take(n)

    def expect_end(self) -> None:
        """Raise unless every byte was consumed (trailing garbage is corruption)."""
        if self.remaining:
            raise CorruptPayloadError(f"{self.remaining} trailing bytes after payload")
