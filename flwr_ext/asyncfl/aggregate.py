"""Delta arithmetic shared by the asynchronous strategies (pure functions over numpy).

Every function accumulates in float64 and returns each tensor in its own dtype. The work runs
in blocks of :data:`BLOCK` elements through two reused float64 buffers, so a 1M-parameter
update touches no fresh float64 temporaries (whose page faults cost more than the arithmetic);
each element goes through the same operations in the same order as the plain expressions
``((1 - a) * x.astype(float64) + a * y.astype(float64)).astype(x.dtype)``, so the results are
bit-identical to them (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]

#: Elements per block (two float64 buffers of 1 MiB each: cache-sized).
BLOCK = 131072


def _blocked(
    like: np.ndarray, inputs: Sequence[np.ndarray], body: Callable[..., None]
) -> np.ndarray:
    """``out`` (``like``'s shape and dtype) from ``body(acc, tmp, *input_blocks)`` per block.

    ``body`` leaves the float64 result of the block in ``acc``; ``tmp`` is scratch.
    """
    out = np.empty(like.shape, dtype=like.dtype)
    flat_out = out.reshape(-1)
    flat_in = [np.asarray(x).reshape(-1) for x in inputs]
    n = flat_out.size
    size = min(BLOCK, max(n, 1))
    acc_buf, tmp_buf = np.empty(size, np.float64), np.empty(size, np.float64)
    for i in range(0, n, size):
        j = min(i + size, n)
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

    def body(acc, tmp, *blocks):
        it = iter(blocks)
        for i, (w, pair) in enumerate(zip(ws, pairs, strict=True)):
            x = np.subtract(next(it), next(it)) if pair else next(it)
            np.multiply(x, w, out=acc if i == 0 else tmp, dtype=np.float64)
            if i:
                acc += tmp

    out = {}
    for k in deltas[0]:
        inputs = []
        for d in deltas:
            inputs += [d.a[k], d.b[k]] if isinstance(d, Difference) else [d[k]]
        like = deltas[0][k] if not pairs[0] else deltas[0].b[k]
        out[k] = _blocked(like, inputs, body)
    return out


def add_scaled(params: Params, delta: Params, scale: float = 1.0) -> Params:
    """``params + scale * delta`` (a new dict; inputs untouched)."""
    s = float(scale)

    def body(acc, tmp, x, d):
        acc[...] = x
        np.multiply(d, s, out=tmp, dtype=np.float64)
        acc += tmp

    return {k: _blocked(v, [v, delta[k]], body) for k, v in params.items()}


def mix(params: Params, new: Params, alpha: float) -> Params:
    """``(1 - alpha) * params + alpha * new`` (FedAsync, Xie et al. 2019, eq. 2)."""
    a = float(alpha)

    def body(acc, tmp, x, y):
        np.multiply(x, 1.0 - a, out=acc, dtype=np.float64)
        np.multiply(y, a, out=tmp, dtype=np.float64)
        acc += tmp

    return {k: _blocked(v, [v, new[k]], body) for k, v in params.items()}
