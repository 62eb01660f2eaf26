"""Tensor codec: a pipeline of sparsify -> quantise -> entropy-code, and its wire format.

Wire format, version 2 (one payload per tensor, all integers are LEB128 varints)::

    magic "FX" | version u8 | codec id u8 | dtype code u8 | ndim u8 | dims...
    sparsifier u8   0 dense
                    1 indices:  k, gap-coded positions (see entropy.encode_indices)
                    2 random-k: k, seed (positions regenerated from the seed)
    quantiser u8    0 raw:      k values in the tensor dtype (plain or zstd)
                    1 codebook: C u8, C centroids (f32, f64 for float64 tensors), k symbols
                    2 qsgd:     s, bucket, ceil(k/bucket) f32 norms, k symbols in [0, 2s]
                    3 uniform:  bits u8, lo f32, hi f32, k symbols in [0, 2^bits)
    (end; trailing bytes are an error)

A symbol stream is empty, constant, ANS-coded with its counts, or (v2) zstd bytes; see
:mod:`flwr_ext.compression.entropy`. Version-1 payloads are still decoded.

The payload travels as ``flwr.app.Array(dtype=<tensor dtype>, shape=<tensor shape>,
stype="flwr-ext/<codec>", data=<payload>)`` under the tensor's own name; the decoder checks that
the Array's dtype and shape agree with the payload header (and with the reference the server
sent, when given). Every count is validated before allocation; the codec id must be one of
``CODEC_IDS`` and, when the decoder is given the Array's stype, the one that stype names. The
output is allocated once and decoded into in place (peak ~ the tensor plus the payload);
``max_bytes`` (per tensor) and :func:`decode_update` (per reply, e.g. :func:`reply_budget` of what
the server sent) bound what a payload may expand to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from . import entropy
from .errors import ConfigError, CorruptPayloadError, PayloadLimitError, UnsupportedVersionError
from .quantize import (
    kmeans_1d,
    qsgd_dequantize,
    qsgd_quantize,
    uniform_dequantize,
    uniform_quantize,
)
from .sparsify import global_topk_indices, k_for, randomk_indices, topk_indices
from .wire import DTYPE_CODE, DTYPES, MAGIC, MAX_NDIM, SUPPORTED_VERSIONS, VERSION, Reader, Writer

#: Hard ceiling on the elements of one decoded tensor (keeps index arithmetic in int64).
MAX_ELEMENTS_HARD = 1 << 31
#: Default ceiling when the decoder is given no reference shape (1 GiB of float32).
DEFAULT_MAX_ELEMENTS = 1 << 28

SPARSIFIERS = ("none", "topk", "global_topk", "randomk")
QUANTIZERS = ("none", "kmeans", "qsgd", "uniform")
_SP_DENSE, _SP_INDICES, _SP_RANDOMK = 0, 1, 2
_Q_RAW, _Q_KMEANS, _Q_QSGD, _Q_UNIFORM = 0, 1, 2, 3
#: Codec ids written in the header. Decoding is driven by the stage bytes, but an id that is
#: not in this table, or one that the Array's stype does not name, is rejected.
CODEC_IDS = {"custom": 0, "raw": 1, "fedzip": 2, "dgc": 3, "qsgd-8bit": 4, "sparse-lora": 5}
_CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
#: Prefix of the Array stype of every payload (``"flwr-ext/<codec name>"``).
STYPE_PREFIX = "flwr-ext/"
_FLOATS = ("float16", "float32", "float64")


@dataclass(frozen=True)
class PipelineConfig:
    """Stages of a compression pipeline (immutable; presets are instances of it).

    Parameters
    ----------
    name : str
        Codec name; the Array stype is ``"flwr-ext/<name>"``.
    sparsify : str
        ``"none"``, ``"topk"`` (per layer), ``"global_topk"`` or ``"randomk"``.
    density : float
        Fraction of coordinates kept by the sparsifier (after warm-up).
    quantize : str
        ``"none"`` (kept values sent exactly), ``"kmeans"``, ``"qsgd"`` or ``"uniform"``.
    clusters : int
        k-means codebook size (FedZip: 3).
    levels : int
        QSGD levels ``s`` (127 gives 8-bit signed symbols).
    bucket : int
        QSGD bucket size (values sharing one norm).
    bits : int
        Uniform quantiser bits.
    error_feedback : bool
        Keep what was not sent in a residual and add it to the next update.
    momentum : float
        DGC momentum correction factor (0 disables it); needs ``error_feedback``.
    warmup : tuple[float, ...]
        Densities of rounds 1, 2, ... (DGC warm-up); later rounds use ``density``.
    include : tuple[str, ...]
        If non-empty, only tensors whose name contains one of these substrings go through the
        lossy stages; the others are sent exactly (raw, zstd).
    dense_below : int
        Tensors with fewer elements than this skip the sparsifier: all their coordinates go
        through the quantiser (and error feedback). DGC's reference implementation
        (synxlin/deep-gradient-compression, ``train.py``) likewise sparsifies only tensors with
        ``dim() > 1`` and sends biases dense: a 2 % top-k of a 10-element bias keeps 1 value,
        while the whole bias as 3-cluster codes costs a few bytes. 0 (default) disables it.
    """

    name: str = "custom"
    sparsify: str = "none"
    density: float = 1.0
    quantize: str = "none"
    clusters: int = 3
    levels: int = 127
    bucket: int = 512
    bits: int = 8
    error_feedback: bool = False
    momentum: float = 0.0
    warmup: tuple[float, ...] = field(default_factory=tuple)
    include: tuple[str, ...] = field(default_factory=tuple)
    dense_below: int = 0

    def __post_init__(self) -> None:
        if self.sparsify not in SPARSIFIERS:
            raise ConfigError(f"sparsify must be one of {SPARSIFIERS}")
        if self.quantize not in QUANTIZERS:
            raise ConfigError(f"quantize must be one of {QUANTIZERS}")
        if not 0.0 < self.density <= 1.0:
            raise ConfigError("density must be in (0, 1]")
        if not 1 <= self.clusters <= 256:
            raise ConfigError("clusters must be in [1, 256]")
        if not 1 <= self.levels <= 1 << 15:
            raise ConfigError("levels must be in [1, 32768]")
        if not 1 <= self.bucket <= 1 << 24:
            raise ConfigError("bucket must be in [1, 2**24]")
        if not 1 <= self.bits <= 16:
            raise ConfigError("bits must be in [1, 16]")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("momentum must be in [0, 1)")
        if self.dense_below < 0:
            raise ConfigError("dense_below must be >= 0")
        if self.momentum and not self.error_feedback:
            raise ConfigError("momentum correction needs error_feedback=True")

    @property
    def stype(self) -> str:
        """Array stype of the payloads of this pipeline."""
        return f"{STYPE_PREFIX}{self.name}"

    def compresses(self, name: str) -> bool:
        """Whether tensor ``name`` goes through the lossy stages."""
        return not self.include or any(s in name for s in self.include)


# --------------------------------------------------------------------------- encoding
def _header(w: Writer, codec_id: int, x: np.ndarray) -> None:
    w.raw(MAGIC)
    w.u8(VERSION)
    w.u8(codec_id)
    w.u8(DTYPE_CODE[str(x.dtype)])
    w.u8(x.ndim)
    for d in x.shape:
        w.varint(int(d))


def encode_tensor(
    x: np.ndarray,
    config: PipelineConfig,
    *,
    indices: np.ndarray | None = None,
    seed: int = 0,
    density: float | None = None,
    lossy: bool = True,
    reconstruct: bool = True,
) -> tuple[bytes, np.ndarray | None]:
    """Encode one tensor; returns ``(payload, reconstruction)``.

    Parameters
    ----------
    x : np.ndarray
        The tensor (an update). Non-float tensors are always sent exactly.
    config : PipelineConfig
        The pipeline.
    indices : np.ndarray, optional
        Precomputed sorted positions (global top-k); otherwise chosen by ``config.sparsify``.
    seed : int
        Seed of random-k positions and of QSGD's stochastic rounding (0 <= seed < 2**64).
    density : float, optional
        Overrides ``config.density`` (warm-up).
    lossy : bool
        ``False`` sends the tensor exactly whatever the config.
    reconstruct : bool
        Also compute what the decoder will return (error feedback needs it); ``False`` skips
        that work and returns ``None`` in its place.

    Returns
    -------
    payload : bytes
        The wire payload.
    reconstruction : np.ndarray
        Exactly what :func:`decode_tensor` will return for this payload (for error feedback),
        or ``None`` when ``reconstruct`` is false.
    """
    dtype = str(x.dtype)
    if dtype not in DTYPE_CODE:
        raise ConfigError(f"unsupported dtype {dtype}")
    if x.ndim > MAX_NDIM or x.size > MAX_ELEMENTS_HARD:
        raise ConfigError("tensor has too many dimensions or elements")
    lossy = lossy and dtype in _FLOATS
    density = config.density if density is None else density
    flat = np.ascontiguousarray(x).reshape(-1)
    numel = flat.size
    w = Writer()
    _header(w, CODEC_IDS.get(config.name, 0), x)

    # ---- sparsify
    small = numel < config.dense_below
    if not lossy or ((config.sparsify == "none" or small) and indices is None):
        w.u8(_SP_DENSE)
        idx = None
    elif config.sparsify == "randomk" and indices is None:
        k = k_for(numel, density)
        w.u8(_SP_RANDOMK)
        w.varint(k)
        w.varint(seed)
        idx = randomk_indices(numel, k, seed)
    else:
        if indices is None:
            indices = topk_indices(flat, k_for(numel, density), seed=seed & 0xFFFFFFFF)
        idx = np.asarray(indices, dtype=np.int64)
        w.u8(_SP_INDICES)
        w.varint(idx.size)
        entropy.encode_indices(idx, w)
    values = flat if idx is None else flat[idx]

    # ---- quantise
    quant = config.quantize if lossy else "none"
    if quant == "none" or values.size == 0:
        w.u8(_Q_RAW)
        entropy.encode_raw(values, w)
        recon_vals = values
    elif quant == "kmeans":
        codebook, labels = kmeans_1d(values, config.clusters)
        cb_dtype = np.float64 if dtype == "float64" else np.float32
        codebook = codebook.astype(cb_dtype)
        w.u8(_Q_KMEANS)
        w.u8(codebook.size - 1)
        w.array(codebook)
        entropy.encode_symbols(labels, w)
        recon_vals = codebook[labels] if reconstruct else None
    elif quant == "qsgd":
        rng = np.random.default_rng(seed)
        bucket = min(config.bucket, max(values.size, 1))
        norms, syms = qsgd_quantize(values, config.levels, bucket, rng)
        w.u8(_Q_QSGD)
        w.varint(config.levels)
        w.varint(bucket)
        w.array(norms)
        entropy.encode_symbols(syms, w)
        recon_vals = qsgd_dequantize(norms, syms, config.levels, bucket) if reconstruct else None
    else:  # uniform
        lo, hi, codes = uniform_quantize(values, config.bits)
        w.u8(_Q_UNIFORM)
        w.u8(config.bits)
        w.f32(lo)
        w.f32(hi)
        entropy.encode_symbols(codes, w)
        recon_vals = uniform_dequantize(lo, hi, codes, config.bits) if reconstruct else None

    if not reconstruct:
        return w.getvalue(), None
    if idx is None:
        recon = np.asarray(recon_vals, dtype=x.dtype).reshape(x.shape)
    else:
        recon = np.zeros(numel, dtype=x.dtype)
        recon[idx] = recon_vals
        recon = recon.reshape(x.shape)
    return w.getvalue(), recon


# --------------------------------------------------------------------------- decoding
def codec_id_for_stype(stype: str) -> int:
    """The codec id that a payload carried as ``Array(stype=stype)`` has in its header.

    ``"flwr-ext/<name>"`` maps to ``CODEC_IDS[name]``; a pipeline of any other name writes the
    ``custom`` id (0).

    Raises
    ------
    CorruptPayloadError
        If ``stype`` is not a ``flwr-ext/`` stype.
    """
    if not isinstance(stype, str) or not stype.startswith(STYPE_PREFIX):
        raise CorruptPayloadError(f"stype {stype!r} is not a flwr-ext payload")
    return CODEC_IDS.get(stype[len(STYPE_PREFIX) :], CODEC_IDS["custom"])


def _finite(arr: np.ndarray, what: str) -> None:
    if arr.dtype.kind != "f":
        return
    for s in range(0, arr.size, entropy.CHUNK):
        if not np.all(np.isfinite(arr[s : s + entropy.CHUNK])):
            raise CorruptPayloadError(f"non-finite {what}")


def _fill(dst: np.ndarray, values, step: int | None = None) -> None:
    """``dst[s:e] = values(s, e)`` chunk by chunk (casts like ``astype``; no full temporary)."""
    step = step or entropy.CHUNK
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, dst.size, step):
            e = min(s + step, dst.size)
            dst[s:e] = values(s, e)


def _scatter_in_place(out: np.ndarray, idx: np.ndarray | entropy.IndexChunks) -> None:
    """Move ``out[j]`` to ``out[idx[j]]`` for ``j < len(idx)`` and zero every other position.

    ``idx`` is strictly increasing, so ``idx[j] >= j``: walking back from the end, a chunk's
    destinations never hold a value that is still to be moved, and the chunk's own slots are
    no earlier chunk's destination. ``out[len(idx):]`` must be zero on entry. Positions of a
    gap stream (:class:`~flwr_ext.compression.entropy.IndexChunks`) are rebuilt chunk by chunk.
    """
    if isinstance(idx, entropy.IndexChunks):
        chunks = (idx.chunk(c) for c in reversed(range(idx.num_chunks)))
    else:
        step = entropy.CHUNK
        chunks = ((s, idx[s : s + step]) for s in reversed(range(0, idx.size, step)))
    for s, pos in chunks:
        e = s + pos.size
        vals = out[s:e].copy()
        out[s:e] = 0
        out[pos] = vals


def decode_tensor(
    data: bytes,
    *,
    expected_shape: tuple[int, ...] | None = None,
    expected_dtype: str | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
    stype: str | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Decode one payload written by :func:`encode_tensor`.

    The output is allocated once, with the size the header declares (after every bound
    check), and every stage writes into it: the peak memory of decoding a dense tensor is the
    tensor plus the payload, that of a sparse one adds its int32 positions.

    Parameters
    ----------
    data : bytes
        The payload.
    expected_shape, expected_dtype : optional
        When given (the server knows what it sent), the header must match them.
    max_elements : int
        Largest tensor the decoder may allocate (capped at ``MAX_ELEMENTS_HARD``).
    allow_nonfinite : bool
        Accept NaN/inf values, centroids or norms (rejected by default).
    stype : str, optional
        The ``Array.stype`` the payload arrived under (``"flwr-ext/fedzip"``); the header's
        codec id must be the one it names (:func:`codec_id_for_stype`).
    max_bytes : int, optional
        Largest decoded tensor in bytes, e.g. what the server sent for this tensor (or what is
        left of a whole reply's budget, see :func:`decode_update`): a reply is never larger
        than the model.

    Raises
    ------
    CorruptPayloadError
        For any truncated, corrupted, inconsistent or oversized payload, an unknown codec id,
        or a codec id that ``stype`` does not name. :class:`PayloadLimitError` (a subclass)
        when the declared size exceeds ``max_elements`` or ``max_bytes``.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CorruptPayloadError("payload is not bytes")
    r = Reader(data)
    if r.remaining < 2 or r.raw(2) != MAGIC:
        raise CorruptPayloadError("bad magic: not a flwr-ext payload")
    version = r.u8()
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(f"wire format version {version} (this decoder: {VERSION})")
    codec_id = r.u8()
    if codec_id not in _CODEC_NAMES:
        raise CorruptPayloadError(f"unknown codec id {codec_id} (known: {sorted(_CODEC_NAMES)})")
    if stype is not None:
        want = codec_id_for_stype(stype)
        if codec_id != want:
            raise CorruptPayloadError(
                f"stype {stype!r} names codec id {want} ({_CODEC_NAMES[want]}) but the payload "
                f"was written by codec id {codec_id} ({_CODEC_NAMES[codec_id]})"
            )
    code = r.u8()
    if code >= len(DTYPES):
        raise CorruptPayloadError(f"unknown dtype code {code}")
    dtype = DTYPES[code]
    ndim = r.u8()
    if ndim > MAX_NDIM:
        raise CorruptPayloadError(f"ndim {ndim} > {MAX_NDIM}")
    limit = min(max_elements, MAX_ELEMENTS_HARD)
    what = "limit"
    if max_bytes is not None:
        by_bytes = max(int(max_bytes), 0) // np.dtype(dtype).itemsize
        if by_bytes < limit:
            limit, what = by_bytes, f"limit of {int(max_bytes)} bytes"
    shape: list[int] = []
    numel = 1
    for _ in range(ndim):
        d = r.varint(MAX_ELEMENTS_HARD, "dimension")
        shape.append(d)
        numel *= d
        if numel > limit:
            raise PayloadLimitError(f"declared {numel} {dtype} elements > {what} ({limit})")
    if expected_shape is not None and tuple(shape) != tuple(expected_shape):
        raise CorruptPayloadError(f"shape {tuple(shape)} != expected {tuple(expected_shape)}")
    if expected_dtype is not None and dtype != expected_dtype:
        raise CorruptPayloadError(f"dtype {dtype} != expected {expected_dtype}")
    is_float = dtype in _FLOATS

    sp = r.u8()
    if sp == _SP_DENSE:
        idx = None
        k = numel
    elif sp == _SP_INDICES:
        k = r.varint(numel, "kept count")
        # a small selection keeps its positions (8 bytes each, fast); a large one only its gaps
        # (one byte each), its positions rebuilt chunk by chunk while scattering
        small = 8 * k <= numel * np.dtype(dtype).itemsize // 4
        idx = (entropy.decode_indices if small else entropy.decode_index_chunks)(r, k, numel)
    elif sp == _SP_RANDOMK:
        k = r.varint(numel, "kept count")
        seed = r.varint((1 << 64) - 1, "seed")
        idx = randomk_indices(numel, k, seed)
    else:
        raise CorruptPayloadError(f"unknown sparsifier {sp}")
    if idx is not None and not is_float:
        raise CorruptPayloadError("sparse payload for a non-float tensor")

    def alloc() -> tuple[np.ndarray, np.ndarray]:
        # dense: every slot is written; a small selection: its own values array, scattered at
        # the end; a large one: zeros (calloc) with the kept values in front, moved in place
        if idx is None:
            out = np.empty(numel, dtype=dtype)
            return out, out
        if isinstance(idx, np.ndarray):
            return np.zeros(numel, dtype=dtype), np.empty(k, dtype=dtype)
        out = np.zeros(numel, dtype=dtype)
        return out, out[:k]

    q = r.u8()
    if q != _Q_RAW and (not is_float or k == 0):
        raise CorruptPayloadError("quantised payload for a non-float or empty selection")
    if q == _Q_RAW:
        out, dst = alloc()
        entropy.decode_raw_into(r, dst)
    elif q == _Q_KMEANS:
        c = r.u8() + 1
        codebook = r.array("float64" if dtype == "float64" else "float32", c)
        if not allow_nonfinite:
            _finite(codebook, "codebook")
        syms = entropy.decode_symbols(r, k, c)
        out, dst = alloc()
        _fill(dst, lambda s, e: codebook[syms[s:e]])
    elif q == _Q_QSGD:
        levels = r.varint(1 << 15, "QSGD levels")
        bucket = r.varint(1 << 24, "QSGD bucket")
        if levels < 1 or bucket < 1:
            raise CorruptPayloadError("QSGD levels and bucket must be positive")
        norms = r.array("float32", -(-k // bucket))
        if not allow_nonfinite:
            _finite(norms, "QSGD norm")
        syms = entropy.decode_symbols(r, k, 2 * levels + 1)
        out, dst = alloc()
        _fill(
            dst,
            lambda s, e: qsgd_dequantize(norms[s // bucket :], syms[s:e], levels, bucket),
            bucket * max(1, entropy.CHUNK // bucket),  # chunks start on a bucket boundary
        )
    elif q == _Q_UNIFORM:
        bits = r.u8()
        if not 1 <= bits <= 16:
            raise CorruptPayloadError(f"uniform bits {bits} out of range")
        lo, hi = r.f32(), r.f32()
        if not allow_nonfinite and not (np.isfinite(lo) and np.isfinite(hi) and lo <= hi):
            raise CorruptPayloadError("invalid uniform range")
        syms = entropy.decode_symbols(r, k, 1 << bits)
        out, dst = alloc()
        _fill(dst, lambda s, e: uniform_dequantize(lo, hi, syms[s:e], bits))
    else:
        raise CorruptPayloadError(f"unknown quantiser {q}")
    r.expect_end()

    if not allow_nonfinite:
        _finite(dst, "value")
    if isinstance(idx, np.ndarray):
        out[idx] = dst
    elif idx is not None:
        _scatter_in_place(out, idx)
    return out.reshape(shape)


def is_sparse_payload(data: bytes) -> bool:
    """Whether a payload carries a sparse selection (top-k / random-k) rather than all values.

    Reads the header only (no decoding); a malformed header raises
    :class:`~flwr_ext.compression.errors.CorruptPayloadError`.
    """
    r = Reader(bytes(data))
    if r.remaining < 2 or r.raw(2) != MAGIC:
        raise CorruptPayloadError("bad magic: not a flwr-ext payload")
    r.u8()  # version (checked by decode_tensor)
    r.u8()  # codec id
    r.u8()  # dtype
    ndim = r.u8()
    if ndim > MAX_NDIM:
        raise CorruptPayloadError(f"ndim {ndim} > {MAX_NDIM}")
    for _ in range(ndim):
        r.varint(MAX_ELEMENTS_HARD, "dimension")
    return r.u8() != _SP_DENSE


# --------------------------------------------------------------------------- whole updates
def reply_budget(sent: Mapping[str, object]) -> int:
    """Bytes of the arrays a node was sent: the most a legitimate reply can decode to.

    ``sent`` maps names to numpy arrays or to anything with ``shape`` and ``dtype``
    (``flwr.app.Array`` works without being deserialised).
    """
    total = 0
    for arr in sent.values():
        numel = 1
        for d in arr.shape:
            numel *= int(d)
        total += numel * np.dtype(str(arr.dtype)).itemsize
    return total


def decode_update(
    payloads: Mapping[str, bytes],
    *,
    stypes: Mapping[str, str] | None = None,
    expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
    expected_dtypes: Mapping[str, str] | None = None,
    max_bytes: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    allow_nonfinite: bool = False,
) -> dict[str, np.ndarray]:
    """Decode every payload of one reply, within one byte budget for the whole reply.

    Parameters
    ----------
    payloads : Mapping[str, bytes]
        Name -> payload, as :func:`encode_update` returned them.
    stypes, expected_shapes, expected_dtypes : Mapping, optional
        Per name, what :func:`decode_tensor` checks (the Array's stype; the shape and dtype the
        server sent or the Array declares). A name missing from a given mapping is an error.
    max_bytes : int, optional
        Budget of the whole reply in decoded bytes, e.g. ``reply_budget(sent)``: each tensor
        may use what the previous ones left.
    max_elements, allow_nonfinite
        As in :func:`decode_tensor`, per tensor.

    Raises
    ------
    CorruptPayloadError
        As :func:`decode_tensor`; :class:`PayloadLimitError` once the budget is exceeded.
    """
    out: dict[str, np.ndarray] = {}
    left = max_bytes
    for name, data in payloads.items():
        kwargs: dict = {}
        for key, table in (
            ("stype", stypes),
            ("expected_shape", expected_shapes),
            ("expected_dtype", expected_dtypes),
        ):
            if table is not None:
                if name not in table:
                    raise CorruptPayloadError(f"payload for unknown tensor {name!r}")
                kwargs[key] = table[name]
        try:
            arr = decode_tensor(
                data,
                max_elements=max_elements,
                allow_nonfinite=allow_nonfinite,
                max_bytes=left,
                **kwargs,
            )
        except CorruptPayloadError as exc:
            raise type(exc)(f"{name!r}: {exc}") from None
        if left is not None:
            left -= arr.nbytes
        out[name] = arr
    return out


def encode_update(
    update: Mapping[str, np.ndarray],
    config: PipelineConfig,
    *,
    seed: int = 0,
    density: float | None = None,
    reconstruct: bool = True,
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Encode every tensor of an update; returns ``(payloads, reconstruction)`` by name.

    With ``reconstruct=False`` the reconstruction dict is empty (no error feedback needs it).

    ``seed`` is mixed with each tensor's position to give per-tensor random-k masks and QSGD
    draws; global top-k picks one threshold across the tensors that ``config`` compresses.
    """
    density = config.density if density is None else density
    names = list(update)
    pre: dict[str, np.ndarray] = {}
    if config.sparsify == "global_topk":
        chosen = {
            n: update[n]
            for n in names
            if config.compresses(n)
            and str(update[n].dtype) in _FLOATS
            and np.asarray(update[n]).size >= config.dense_below
        }
        pre = global_topk_indices(chosen, density, seed=seed & 0xFFFFFFFF)
    payloads: dict[str, bytes] = {}
    recon: dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        tseed = int(np.random.SeedSequence([seed & (2**63 - 1), i]).generate_state(1, np.uint64)[0])
        payloads[name], rec = encode_tensor(
            np.asarray(update[name]),
            config,
            indices=pre.get(name),
            seed=tseed,
            density=density,
            lossy=config.compresses(name),
            reconstruct=reconstruct,
        )
        if rec is not None:
            recon[name] = rec
    return payloads, recon
