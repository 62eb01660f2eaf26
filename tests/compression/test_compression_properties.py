"""Hypothesis property tests: every pipeline round-trips any shape, dtype and content."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flwr_ext.compression import PipelineConfig, decode_tensor, encode_tensor

CONFIGS = [
    PipelineConfig(),
    PipelineConfig(sparsify="topk", density=0.1),
    PipelineConfig(sparsify="topk", density=0.3, quantize="kmeans", clusters=3),
    PipelineConfig(sparsify="randomk", density=0.2, quantize="uniform", bits=4),
    PipelineConfig(quantize="qsgd", levels=127, bucket=16),
    PipelineConfig(quantize="uniform", bits=8),
    PipelineConfig(sparsify="topk", density=1.0, quantize="kmeans", clusters=256),
    PipelineConfig(sparsify="topk", density=0.05, quantize="kmeans", clusters=3, dense_below=50),
]

shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=9)
dtypes = st.sampled_from([np.float32, np.float64, np.float16])


@st.composite
def tensors(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(dtypes)
    shape = draw(shapes)
    kind = draw(st.sampled_from(["random", "zeros", "constant", "sparse"]))
    if kind == "zeros":
        return np.zeros(shape, dtype=dtype)
    if kind == "constant":
        return np.full(shape, draw(st.floats(-100, 100, width=16)), dtype=dtype)
    elems = st.floats(-1e3, 1e3, width=16, allow_subnormal=False)
    arr = draw(hnp.arrays(dtype, shape, elements=elems))
    if kind == "sparse":
        arr = np.where(np.arange(arr.size).reshape(shape) % 5 == 0, arr, 0).astype(dtype)
    return arr


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=tensors(), ci=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 2**64 - 1))
def test_any_tensor_roundtrips(x: np.ndarray, ci: int, seed: int) -> None:
    cfg = CONFIGS[ci]
    payload, recon = encode_tensor(x, cfg, seed=seed)
    out = decode_tensor(payload, expected_shape=x.shape, expected_dtype=str(x.dtype))
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, recon)
    if cfg.quantize == "none":
        # lossless stage: every transmitted coordinate is exact, others are zero
        nz = out != 0
        np.testing.assert_array_equal(out[nz], x[nz])
        if cfg.sparsify == "none":
            np.testing.assert_array_equal(out, x)
    if not np.any(x):
        assert not np.any(out)  # nothing from nothing
    if cfg.quantize == "uniform" and x.size and cfg.sparsify == "none":
        x64 = x.astype(np.float64)
        step = (x64.max() - x64.min()) / ((1 << cfg.bits) - 1)
        # float16 output adds its own rounding on top of the quantiser's half step
        tol = step / 2 + np.abs(x64).max() * (2e-3 if x.dtype == np.float16 else 1e-6) + 1e-9
        assert np.max(np.abs(out.astype(np.float64) - x64)) <= tol


@settings(max_examples=60, deadline=None)
@given(x=tensors(), data=st.data())
def test_truncation_always_detected(x: np.ndarray, data: st.DataObject) -> None:
    payload, _ = encode_tensor(x, CONFIGS[2])
    cut = data.draw(st.integers(0, len(payload) - 1))
    try:
        decode_tensor(payload[:cut], expected_shape=x.shape)
    except ValueError:
        return
    raise AssertionError("truncated payload decoded without error")
