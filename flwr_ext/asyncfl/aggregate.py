"""Delta arithmetic shared by the asynchronous strategies (pure functions over numpy).

Every function accumulates in float64 and returns each tensor in its own dtype. The work runs
in blocks of :data:`BLOCK` elements through float64 buffers that each thread allocates once and
reuses, so a 1M-parameter update touches no fresh temporaries (whose page faults cost more than
the arithmetic); each element goes through the same operations in the same order as the plain
expressions ``((1 - a) * x.astype(float64) + a * y.astype(float64)).astype(x.dtype)``, so the
results are bit-identical to them (tested). Results are written straight into
:func:`~flwr_ext.arrays.npy_empty` arrays: committed as a new model version, they are sent
without being copied again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from flwr_ext.arrays import npy_empty

Params = dict[str, np.ndarray]

#: Elements per block (float64 buffers of 512 KiB each: they stay in the L2 cache).
BLOCK = 65536

_scratch = threading.local()


def _buffer(name: str, dtype: np.dtype) -> np.ndarray:
    """This thread's reused block buffer ``name`` of ``dtype`` (:data:`BLOCK` elements)."""
    key = (name, np.dtype(dtype).str, BLOCK)
    bufs = _scratch.__dict__.setdefault("buffers", {})
    buf = bufs.get(key)
    if buf is None:
        buf = bufs[key] = np.empty(BLOCK, dtype)
    return buf


def _scaled(out: np.ndarray, x: np.ndarray, w: float) -> None:
    """``out = float64(x) * w``: the value of ``np.multiply(x, w, dtype=float64)``.

    Two plain passes over a cached block (convert, then multiply in place) are faster than
    the ufunc's buffered cast. The copy casts as the ufunc does (``same_kind``: a complex
    tensor raises instead of losing its imaginary part).
    """
    np.copyto(out, x, casting="same_kind")
    out *= w


def _blocked(
    like: np.ndarray, inputs: Sequence[np.ndarray], body: Callable[..., None]
) -> np.ndarray:
    """``out`` (``like``'s shape and dtype) from ``body(acc, tmp, *input_blocks)`` per block.

    ``body`` leaves the float64 result of the block in ``acc``; ``tmp`` is scratch.
    """
    out = npy_empty(like.shape, like.dtype)
    flat_out = out.reshape(-1)
    flat_in = [np.asarray(x).reshape(-1) for x in inputs]
    n = flat_out.size
    acc_buf, tmp_buf = _buffer("acc", np.float64), _buffer("tmp", np.float64)
    for i in range(0, n, BLOCK):
        j = min(i + BLOCK, n)
        acc, tmp = acc_buf[: j - i], tmp_buf[: j - i]
        body(acc, tmp, *(x[i:j] for x in flat_in))
        flat_out[i:j] = acc
    return out


@dataclass(frozen=True)
class Difference:
    """``a - b`` per tensor, not materialised: :func:`weighted_delta` computes it blockwise.

    The subtraction is done in the tensors' own dtype, exactly as ``a[k] - b[k]`` would.
    """

    a: Params
    b: Params

    def __iter__(self):
        return iter(self.b)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.a[key] - self.b[key]


def weighted_delta(deltas: Sequence[Params | Difference], weights: Sequence[float]) -> Params:
    """``sum_i w_i * delta_i`` (accumulated in float64, returned in each tensor's dtype).

    A delta may be a :class:`Difference` (a client's weights minus the model it was sent),
    so a buffer of full-weight replies is aggregated without materialising the deltas.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError("need as many weights as (at least one) deltas")
    ws = [float(w) for w in weights]
    pairs = [isinstance(d, Difference) for d in deltas]

    out = {}
    for k in deltas[0]:
        inputs, diff_types = [], []
        for d in deltas:
            if isinstance(d, Difference):
                a, b = np.asarray(d.a[k]), np.asarray(d.b[k])
                inputs += [a, b]
                diff_types.append(np.result_type(a, b))  # the dtype of ``a - b``
            else:
                inputs.append(d[k])
                diff_types.append(None)
        # ``a - b`` goes to a reused buffer of its own dtype (the same values as a fresh array)
        diffs = [_buffer("diff", t) if t is not None else None for t in diff_types]

        def body(acc, tmp, *blocks, diffs=diffs):
            it = iter(blocks)
            for i, (w, diff) in enumerate(zip(ws, diffs, strict=True)):
                x = next(it)
                if diff is not None:
                    x = np.subtract(x, next(it), out=diff[: x.size])
                _scaled(acc if i == 0 else tmp, x, w)
                if i:
                    acc += tmp

        like = deltas[0][k] if not pairs[0] else deltas[0].b[k]
        out[k] = _blocked(like, inputs, body)
    return out


def add_scaled(params: Params, delta: Params, scale: float = 1.0) -> Params:
    """``params + scale * delta`` (a new dict; inputs untouched)."""
    s = float(scale)

    def body(acc, tmp, x, d):
        acc[...] = x
        _scaled(tmp, d, s)
        acc += tmp

    return {k: _blocked(v, [v, delta[k]], body) for k, v in params.items()}


def mix(params: Params, new: Params, alpha: float) -> Params:
    """``(1 - alpha) * params + alpha * new`` (FedAsync, Xie et al. 2019, eq. 2)."""
    a = float(alpha)

    def body(acc, tmp, x, y):
        _scaled(acc, x, 1.0 - a)
        _scaled(tmp, y, a)
        acc += tmp

    return {k: _blocked(v, [v, new[k]], body) for k, v in params.items()}
