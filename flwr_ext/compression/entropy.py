"""Entropy-coding stage: symbol streams with ANS, index gaps, and raw value bytes with zstd.

* **Symbol streams** (cluster ids, quantisation levels, gap buckets) are coded with
  ``constriction``'s ANS coder under a categorical model built from the stream's own empirical
  frequencies (Duda 2013, "Asymmetric numeral systems"); the counts travel in the payload so
  the decoder rebuilds exactly the same model. A stream of one distinct symbol costs one varint.
* **Long byte-sized streams** (at least ``ZSTD_MIN_SYMBOLS`` symbols, all < 256, e.g. dense
  QSGD-8bit levels) are stored as bytes with ``zstandard`` (level 1): its Huffman literal
  stage codes them within ~1% of the order-0 entropy, an order of magnitude faster than ANS.
* **Sparse indices** never go on the wire as absolute int32 values. Sorted positions become gaps
  ``g_j = i_j - i_{j-1} - 1``; each ``v = g + 1`` is split into a small "log-linear" bucket
  symbol (exponent and the two bits after the leading one, as in zstd's offset codes) that is
  ANS-coded, plus the remaining low bits, stored raw with ``np.packbits``. For geometric gaps
  this is within a few percent of the gap entropy.
* **Raw values** are stored as little-endian bytes, zstd-compressed when that is smaller.
  Decompression is bounded by the size the header declares (a zstd frame that claims a huge
  content size cannot make the decoder allocate it) and writes straight into the caller's
  array (:func:`decode_raw_into`): no intermediate copies of the decoded bytes.

Decoding keeps memory near the size of the decoded tensor: symbol streams come back in the
smallest unsigned dtype their alphabet fits (uint8 for codebook ids, QSGD-8bit levels and gap
buckets), and index gaps are turned into positions in fixed-size chunks.

No hand-written Huffman: the entropy coders are ``constriction`` and ``zstandard``.
"""

from __future__ import annotations

import constriction
import numpy as np
import zstandard

from .errors import CorruptPayloadError
from .wire import Reader, Writer

#: Mantissa bits kept inside a gap symbol (2 -> four sub-buckets per power of two).
GAP_MANTISSA_BITS = 2
_SMALL = 1 << (GAP_MANTISSA_BITS + 1)
#: Largest alphabet a symbol stream may declare.
MAX_ALPHABET = 1 << 16

_MODE_EMPTY, _MODE_CONST, _MODE_ANS, _MODE_ZSTD8 = 0, 1, 2, 3
#: Streams at least this long with symbols < 256 are coded as bytes with zstd (wire v2):
#: zstd's literal Huffman stage is within ~1% of the order-0 entropy there and ~10x faster
#: than ANS over millions of symbols (bench/compression.md, section 2 and 3).
ZSTD_MIN_SYMBOLS = 1 << 16
_RAW_PLAIN, _RAW_ZSTD = 0, 1
#: Elements processed per step when turning gaps into positions (bounds the temporaries).
CHUNK = 1 << 18


def symbol_dtype(alphabet: int) -> np.dtype:
    """Smallest dtype that holds symbols ``< alphabet`` (what :func:`decode_symbols` returns)."""
    if alphabet <= 1 << 8:
        return np.dtype(np.uint8)
    if alphabet <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_symbols(symbols: np.ndarray, w: Writer) -> None:
    """Write a stream of non-negative integer symbols (its length is known to the decoder).

    Parameters
    ----------
    symbols : np.ndarray
        1-D array of integers in ``[0, MAX_ALPHABET)``.
    w : Writer
        Destination.
    """
    n = symbols.size
    if n == 0:
        w.u8(_MODE_EMPTY)
        return
    lo, hi = int(symbols.min()), int(symbols.max())
    if lo < 0 or hi >= MAX_ALPHABET:
        raise ValueError(f"symbol out of range [0, {MAX_ALPHABET})")
    if lo == hi:
        w.u8(_MODE_CONST)
        w.varint(lo)
        return
    if n >= ZSTD_MIN_SYMBOLS and hi < 256:
        w.u8(_MODE_ZSTD8)
        encode_raw(symbols.astype(np.uint8), w, level=1)
        return
    counts = np.bincount(symbols, minlength=hi + 1)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32, copy=False), _model(counts))
    words = coder.get_compressed()
    w.u8(_MODE_ANS)
    w.varint(hi + 1)
    w.varints(counts)
    w.varint(words.size)
    w.array(words.astype(np.uint32))


def decode_symbols(r: Reader, n: int, alphabet: int) -> np.ndarray:
    """Read ``n`` symbols, each checked to be ``< alphabet``.

    Returns them in :func:`symbol_dtype` ``(alphabet)`` (uint8 for alphabets up to 256), so a
    stream of ``n`` symbols costs ``n`` bytes, not ``8 n``.

    Raises
    ------
    CorruptPayloadError
        On any inconsistency: wrong mode, counts that do not sum to ``n``, a word count larger
        than the payload, a decoded histogram that differs from the declared one.
    """
    dtype = symbol_dtype(alphabet)
    mode = r.u8()
    if mode == _MODE_EMPTY:
        if n != 0:
            raise CorruptPayloadError("empty symbol stream where symbols were expected")
        return np.zeros(0, dtype=dtype)
    if n == 0:
        raise CorruptPayloadError("non-empty symbol stream where none was expected")
    if mode == _MODE_CONST:
        sym = r.varint(alphabet - 1, "constant symbol")
        return np.full(n, sym, dtype=dtype)
    if mode == _MODE_ZSTD8:
        raw = np.empty(n, dtype=np.uint8)
        decode_raw_into(r, raw)
        if int(raw.max()) >= alphabet:
            raise CorruptPayloadError("symbol beyond the alphabet")
        return raw if dtype == np.uint8 else raw.astype(dtype)
    if mode != _MODE_ANS:
        raise CorruptPayloadError(f"unknown symbol-stream mode {mode}")
    size = r.varint(min(alphabet, MAX_ALPHABET), "alphabet size")
    if size < 2:
        raise CorruptPayloadError("ANS stream with fewer than two symbols")
    # every count takes >= 1 byte: bound the table by the bytes left before reading it
    if size > r.remaining:
        raise CorruptPayloadError("alphabet larger than the payload")
    counts = np.array([r.varint(n, "symbol count") for _ in range(size)], dtype=np.int64)
    if int(counts.sum()) != n:
        raise CorruptPayloadError("symbol counts do not sum to the stream length")
    if np.count_nonzero(counts) < 2:
        raise CorruptPayloadError("ANS stream with a single used symbol")
    nwords = r.varint(r.remaining // 4, "ANS word count")
    words = r.array("uint32", nwords)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        out = coder.decode(_model(counts), n)
        empty = coder.is_empty()
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise CorruptPayloadError(f"ANS stream does not decode: {exc}") from None
    out = np.asarray(out)
    if not empty or not np.array_equal(np.bincount(out, minlength=size), counts):
        raise CorruptPayloadError("ANS stream does not match its declared symbol counts")
    return out.astype(dtype, copy=False)  # size <= alphabet: every symbol fits


# --------------------------------------------------------------------------- index gaps
def _gap_symbols(v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``v >= 1`` into (bucket symbol, number of extra bits, extra bits value)."""
    m = GAP_MANTISSA_BITS
    exp = np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1  # floor(log2 v), exact < 2^53
    nb = np.maximum(exp - m, 0)
    top = (v >> nb) - (1 << m)
    sym = np.where(v < _SMALL, v, _SMALL + (nb - 1) * (1 << m) + top)
    extra = v & ((np.int64(1) << nb) - 1)
    return sym, nb, extra


def _pack_bits(values: np.ndarray, nbits: np.ndarray) -> bytes:
    """Concatenate each ``values[i]`` on ``nbits[i]`` bits, MSB first."""
    total = int(nbits.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(values.size), nbits)
    start = np.cumsum(nbits) - nbits
    shift = (nbits[owner] - 1) - (np.arange(total) - start[owner])
    bits = ((values[owner] >> shift) & 1).astype(np.uint8)
    return np.packbits(bits).tobytes()


def _unpack_bits(data: bytes, nbits: np.ndarray, offset: int = 0) -> np.ndarray:
    """Inverse of :func:`_pack_bits` for values starting ``offset`` bits into ``data``."""
    total = int(nbits.sum())
    if total == 0:
        return np.zeros(nbits.size, dtype=np.int64)
    first, skip = divmod(offset, 8)
    count = (skip + total + 7) // 8
    raw = np.frombuffer(data, dtype=np.uint8, count=count, offset=first)
    bits = np.unpackbits(raw)[skip : skip + total].astype(np.int64)
    owner = np.repeat(np.arange(nbits.size), nbits)
    start = np.cumsum(nbits) - nbits
    shift = (nbits[owner] - 1) - (np.arange(total) - start[owner])
    # every per-owner sum is < 2**53 (bounded numel), so float64 weights are exact
    out = np.bincount(owner, weights=(bits << shift).astype(np.float64), minlength=nbits.size)
    out = out.astype(np.int64)
    return out


def max_gap_symbol(numel: int) -> int:
    """Largest bucket symbol a gap inside a tensor of ``numel`` elements can produce."""
    sym, _, _ = _gap_symbols(np.array([max(numel, 1)], dtype=np.int64))
    return int(sym[0])


def encode_indices(indices: np.ndarray, w: Writer) -> None:
    """Write strictly increasing non-negative positions as entropy-coded gaps."""
    idx = indices.astype(np.int64, copy=False)
    if idx.size == 0:
        encode_symbols(idx, w)
        return
    v = np.diff(idx, prepend=-1)  # = gap + 1 >= 1
    sym, nb, extra = _gap_symbols(v)
    encode_symbols(sym, w)
    w.raw(_pack_bits(extra, nb))


def _gap_fields(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(is a bucket symbol, mantissa bits t, number of extra bits) of gap symbols."""
    m = GAP_MANTISSA_BITS
    big = sym >= _SMALL
    t = np.where(big, sym - _SMALL, 0)
    nb = np.where(big, t // (1 << m) + 1, 0)
    return big, t, nb


def _chunk_bits(sym: np.ndarray) -> tuple[list[int], int]:
    """Bit offset of each chunk's extra bits, and their total; rejects gap symbol 0."""
    bits: list[int] = []
    total = 0
    for s in range(0, sym.size, CHUNK):
        c = sym[s : s + CHUNK].astype(np.int64)
        if np.any(c == 0):
            raise CorruptPayloadError("gap symbol 0 is invalid")
        bits.append(total)
        total += int(_gap_fields(c)[2].sum())
    return bits, total


class IndexChunks:
    """Sparse positions read from a gap stream, produced ``CHUNK`` at a time on demand.

    Reading (:func:`decode_index_chunks`) checks every gap and the last position and records
    where each chunk starts (bit offset, first position), so :meth:`chunk` can rebuild the
    positions of any chunk in any order; only the gap symbols (one byte each) stay in memory.
    """

    def __init__(self, sym: np.ndarray, extra: bytes, bits: list[int], starts: list[int]) -> None:
        self._sym, self._extra, self._bits, self._starts = sym, extra, bits, starts
        self.size = int(sym.size)
        self.dtype = np.dtype(np.int64)

    @property
    def num_chunks(self) -> int:
        """Number of chunks (``ceil(size / CHUNK)``)."""
        return len(self._starts)

    def _gaps(self, c: int) -> np.ndarray:
        m = GAP_MANTISSA_BITS
        sym = self._sym[c * CHUNK : (c + 1) * CHUNK].astype(np.int64)
        big, t, nb = _gap_fields(sym)
        extra = _unpack_bits(self._extra, nb, self._bits[c])
        return np.where(big, (((1 << m) + t % (1 << m)) << nb) | extra, sym)

    def chunk(self, c: int) -> tuple[int, np.ndarray]:
        """``(first index, positions)`` of chunk ``c``."""
        pos = np.cumsum(self._gaps(c))
        pos += self._starts[c] - 1
        return c * CHUNK, pos

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.size, dtype=dtype or np.int64)
        for c in range(self.num_chunks):
            s, pos = self.chunk(c)
            out[s : s + pos.size] = pos
        return out


def decode_index_chunks(r: Reader, k: int, numel: int) -> IndexChunks:
    """Read ``k`` strictly increasing positions ``< numel`` without materialising them.

    Every gap is checked (and the last position against ``numel``) before this returns, so a
    payload that lies about its positions is rejected here, before any value is decoded.
    """
    sym = decode_symbols(r, k, max_gap_symbol(numel) + 1)
    bits, total_bits = _chunk_bits(sym)
    extra_bytes = r.raw((total_bits + 7) // 8)
    chunks = IndexChunks(sym, extra_bytes, bits, [])
    first = 0  # = previous position + 1
    for c in range(len(bits)):
        v = chunks._gaps(c)
        if int(v.max()) > numel:
            raise CorruptPayloadError("sparse index gap beyond the tensor size")
        chunks._starts.append(first)
        first += int(v.sum())  # sums of gaps <= k * numel < 2**63 (numel <= 2**31)
        if first - 1 >= numel:
            raise CorruptPayloadError("sparse index beyond the tensor size")
    return chunks


def decode_indices(r: Reader, k: int, numel: int) -> np.ndarray:
    """Read ``k`` strictly increasing positions, each checked to be ``< numel`` (int64).

    The positions are materialised (``8 k`` bytes) in one pass over the gaps; for selections
    that are a large part of the tensor, :func:`decode_index_chunks` keeps only the gaps.
    """
    sym = decode_symbols(r, k, max_gap_symbol(numel) + 1)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    bits, total_bits = _chunk_bits(sym)
    chunks = IndexChunks(sym, r.raw((total_bits + 7) // 8), bits, [])
    idx = np.empty(k, dtype=np.int64)
    last = -1
    for c in range(len(bits)):
        v = chunks._gaps(c)
        if int(v.max()) > numel:
            raise CorruptPayloadError("sparse index gap beyond the tensor size")
        pos = np.cumsum(v)  # chunk * numel < 2**63 because numel <= MAX_ELEMENTS_HARD
        pos += last
        if pos[-1] >= numel:
            raise CorruptPayloadError("sparse index beyond the tensor size")
        idx[c * CHUNK : c * CHUNK + pos.size] = pos
        last = int(pos[-1])
    return idx


# --------------------------------------------------------------------------- raw values
def encode_raw(arr: np.ndarray, w: Writer, level: int = 1) -> None:
    """Write an array's little-endian bytes, zstd-compressed when that is smaller."""
    data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    packed = zstandard.ZstdCompressor(level=level).compress(data) if data else b""
    if data and len(packed) < len(data):
        w.u8(_RAW_ZSTD)
        w.blob(packed)
    else:
        w.u8(_RAW_PLAIN)
        w.raw(data)


def decode_raw_into(r: Reader, out: np.ndarray) -> None:
    """Read the values written by :func:`encode_raw` straight into ``out`` (1-D, contiguous).

    ``out``'s length and dtype say what the header declared; zstd output is written into
    ``out``'s own memory (``readinto``), never held as bytes first, and a frame that produces
    more or fewer bytes than ``out`` holds is rejected.
    """
    mode = r.u8()
    dt = np.dtype(out.dtype).newbyteorder("<")
    expected = out.size * dt.itemsize
    if mode == _RAW_PLAIN:
        out[...] = np.frombuffer(r.raw_view(expected), dtype=dt)
        return
    if mode != _RAW_ZSTD:
        raise CorruptPayloadError(f"unknown raw-values mode {mode}")
    packed = r.blob_view(r.remaining, "zstd frame length")
    dst = memoryview(out.view(np.uint8).reshape(-1))
    got = 0
    try:  # memory is ``out`` itself: a frame's claimed content size allocates nothing
        with zstandard.ZstdDecompressor().stream_reader(packed) as reader:
            while got < expected:
                n = reader.readinto(dst[got : got + min(expected - got, 1 << 24)])
                if not n:
                    break
                got += n
            extra = reader.read(1) if got == expected else b""
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"zstd frame does not decode: {exc}") from None
    if got != expected or extra:
        raise CorruptPayloadError("zstd frame size differs from the declared element count")
    if dt != out.dtype:  # big-endian host: the bytes on the wire are little-endian
        out.byteswap(inplace=True)


def decode_raw(r: Reader, dtype: str, count: int) -> np.ndarray:
    """Read ``count`` items of ``dtype`` written by :func:`encode_raw` (bounded output)."""
    out = np.empty(count, dtype=np.dtype(dtype).newbyteorder("="))
    decode_raw_into(r, out)
    return out
