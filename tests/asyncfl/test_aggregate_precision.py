"""Delta arithmetic: float64 accumulation, dtypes kept, inputs untouched, bad arguments
(mutants that survived ``make mutate`` in flwr_ext/asyncfl/aggregate.py; docs/testing.md)."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.asyncfl.aggregate import add_scaled, mix, weighted_delta


def _exact(xs, ws):
    return sum(np.asarray(x, np.float64) * w for x, w in zip(xs, ws, strict=True))


def test_weighted_delta_accumulates_in_float64_and_keeps_dtypes():
    rng = np.random.default_rng(0)
    d = [{"w": (rng.normal(size=50) * 1000).astype(np.float16)} for _ in range(3)]
    ws = [0.3, 0.3, 0.4]
    out = weighted_delta(d, ws)["w"]
    assert out.dtype == np.float16
    # float16 partial sums would differ in about half of the coordinates here
    np.testing.assert_array_equal(out, _exact([x["w"] for x in d], ws).astype(np.float16))
    f32 = weighted_delta([{"b": np.ones(2, np.float32)}], [2.0])["b"]
    assert f32.dtype == np.float32 and f32.tolist() == [2.0, 2.0]


def test_add_scaled_and_mix_compute_in_float64():
    rng = np.random.default_rng(1)
    p = {"w": (rng.normal(size=50) * 1000).astype(np.float32)}
    d16 = {"w": (rng.normal(size=50) * 1000).astype(np.float16)}
    out = add_scaled(p, d16, 1 / 3)["w"]
    assert out.dtype == np.float32
    want = (p["w"].astype(np.float64) + (1 / 3) * d16["w"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(out, want)
    v = np.array([1000.0, 1001.0, 1003.0], np.float16)
    n = np.array([1010.0, 1012.0, 1020.0], np.float16)
    m = mix({"w": v}, {"w": n}, 0.3)["w"]
    assert m.dtype == np.float16
    np.testing.assert_array_equal(m, (0.7 * v.astype(np.float64) + 0.3 * n).astype(np.float16))
    assert m[2] == 1008.0  # float16 arithmetic would give 1008.5
    # inputs untouched, outputs are new arrays
    before = p["w"].copy()
    out2 = add_scaled(p, {"w": np.zeros(50, np.float32)}, 1.0)
    assert out2["w"] is not p["w"]
    out2["w"][:] = 0
    np.testing.assert_array_equal(p["w"], before)


def test_weighted_delta_rejects_bad_arguments():
    with pytest.raises(ValueError, match="as many weights"):
        weighted_delta([], [])
    with pytest.raises(ValueError, match="as many weights"):
        weighted_delta([{"w": np.ones(2)}], [1.0, 2.0])
    with pytest.raises(ValueError, match="as many weights"):
        weighted_delta([{"w": np.ones(2)}, {"w": np.ones(2)}], [1.0])


def test_tensors_larger_than_one_block_are_aggregated_everywhere():
    from flwr_ext.asyncfl.aggregate import BLOCK

    rng = np.random.default_rng(2)
    n = 2 * BLOCK + 3  # three blocks, the last one partial
    d = [{"w": rng.standard_normal(n).astype(np.float32)} for _ in range(2)]
    out = weighted_delta(d, [0.25, 0.75])["w"]
    np.testing.assert_array_equal(out, _exact([x["w"] for x in d], [0.25, 0.75]).astype(np.float32))
    p = add_scaled(d[0], d[1], 2.0)["w"]
    want = (d[0]["w"].astype(np.float64) + 2.0 * d[1]["w"].astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(p, want)
