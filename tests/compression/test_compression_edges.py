"""Edges of the sparsify / quantize / feedback stages that ``make mutate`` showed untested
(docs/testing.md): one-element and empty tensors, ties at the threshold, the dense path of
global top-k, distinct random-k positions, the last warm-up round."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.compression.sparsify import (
    dgc_warmup_density,
    global_topk_indices,
    k_for,
    randomk_indices,
    topk_indices,
)


def test_k_for_edges():
    assert k_for(0, 0.5) == 0
    assert k_for(1, 0.001) == 1  # a one-element tensor keeps its value
    assert k_for(1000, 0.001) == 1 and k_for(1000, 0.0015) == 2 and k_for(10, 2.0) == 10


def test_topk_edges_and_ties():
    one = topk_indices(np.array([3.0]), 1)
    assert one.tolist() == [0] and one.dtype == np.int64
    assert topk_indices(np.array([[0.0, -2.0], [5.0, 0.0]]), 4).tolist() == [1, 2]  # k >= n
    for k in (0, -1):
        empty = topk_indices(np.array([1.0, 2.0]), k)
        assert empty.size == 0 and empty.dtype == np.int64
    assert topk_indices(np.zeros(0), 3).dtype == np.int64
    # ties at the threshold: exactly k, the first ones by position; works below 1 too
    x = np.array([0.3, 0.1, -0.1, 0.1, 0.0, 0.1])
    assert topk_indices(x, 2).tolist() == [0, 1]
    assert topk_indices(x, 3).tolist() == [0, 1, 2]
    assert topk_indices(np.array([0.0, 0.0, 1.0]), 2).tolist() == [2]  # zeros never sent
    # a 2-D tensor is read flat
    m = np.arange(12.0).reshape(3, 4)
    assert topk_indices(m, 3).tolist() == [9, 10, 11]


def test_global_topk_shares_one_threshold_and_ties_in_name_order():
    t = {"a": np.array([0.5, 0.2, 0.2]), "b": np.array([[0.2, 0.9]]), "c": np.zeros(2)}
    # k = ceil(0.5 * 7) = 4: 0.9, 0.5, then two of the three tied 0.2s (a's first, name order)
    out = global_topk_indices(t, 0.5)
    assert {n: v.tolist() for n, v in out.items()} == {"a": [0, 1, 2], "b": [1], "c": []}
    assert all(v.dtype == np.int64 for v in out.values())
    out = global_topk_indices(t, 3 / 7)  # k = 3: one tie only
    assert {n: v.tolist() for n, v in out.items()} == {"a": [0, 1], "b": [1], "c": []}
    # density 1: every non-zero coordinate of every tensor
    full = global_topk_indices(t, 1.0)
    assert {n: v.tolist() for n, v in full.items()} == {"a": [0, 1, 2], "b": [0, 1], "c": []}
    assert all(v.dtype == np.int64 for v in full.values())
    assert global_topk_indices({}, 0.5) == {}
    empty = global_topk_indices({"a": np.zeros(0), "b": np.zeros((0, 3))}, 0.5)
    assert all(v.size == 0 and v.dtype == np.int64 for v in empty.values())


def test_global_topk_is_exact_on_a_large_update():
    rng = np.random.default_rng(0)
    t = {"w": rng.standard_normal((300, 400)), "b": rng.standard_normal(1000) * 3}
    out = global_topk_indices(t, 0.01)
    flat = np.concatenate([np.abs(t["w"]).ravel(), np.abs(t["b"])])
    thr = np.sort(flat)[-k_for(flat.size, 0.01)]
    for n, idx in out.items():
        np.testing.assert_array_equal(idx, np.flatnonzero(np.abs(t[n]).ravel() >= thr))


def test_randomk_draws_distinct_positions_from_the_seed():
    idx = randomk_indices(100, 60, seed=3)
    assert idx.size == 60 and np.unique(idx).size == 60 and idx.dtype == np.int64
    assert idx.tolist() == sorted(idx.tolist()) and idx.min() >= 0 and idx.max() < 100
    np.testing.assert_array_equal(idx, randomk_indices(100, 60, seed=3))
    assert not np.array_equal(idx, randomk_indices(100, 60, seed=4))
    assert randomk_indices(5, 9, seed=0).tolist() == [0, 1, 2, 3, 4]
    for k, n in ((0, 5), (3, 0)):
        e = randomk_indices(n, k, seed=0)
        assert e.size == 0 and e.dtype == np.int64


def test_warmup_uses_every_scheduled_round_including_the_last():
    sched = (0.25, 0.0625, 0.015625)
    assert [dgc_warmup_density(r, 0.001, sched) for r in (0, 1, 2, 3, 4)] == [
        0.001,
        0.25,
        0.0625,
        0.015625,
        0.001,
    ]
    assert dgc_warmup_density(2, 0.1, sched) == 0.1  # never below the final density
    assert dgc_warmup_density(1, 0.01) == 0.01


@pytest.mark.parametrize("n", [1, 2, 7])
def test_tiny_tensors_keep_their_values(n):
    x = np.arange(1.0, n + 1.0)
    assert topk_indices(x, 1).tolist() == [n - 1]
    assert global_topk_indices({"x": x}, 0.01)["x"].tolist() == [n - 1]


# ---------------------------------------------------------------- quantisers

from flwr_ext.compression.quantize import (  # noqa: E402
    kmeans_1d,
    qsgd_dequantize,
    qsgd_quantize,
    uniform_dequantize,
    uniform_quantize,
)


def test_kmeans_returns_a_lloyd_fixed_point():
    rng = np.random.default_rng(5)
    x = np.concatenate(
        [rng.normal(-3, 1.0, 400), rng.normal(0.5, 0.7, 300), rng.exponential(2, 300)]
    )
    cb, labels = kmeans_1d(x)  # FedZip's default: 3 clusters
    assert cb.size == 3 and labels.dtype == np.int64 and np.all(np.diff(cb) > 0)
    for j in range(3):  # each centroid is the mean of its members ...
        assert np.isclose(cb[j], x[labels == j].mean(), rtol=1e-9, atol=1e-12)
    # ... and each value is labelled with its nearest centroid
    np.testing.assert_array_equal(labels, np.argmin(np.abs(x[:, None] - cb[None, :]), axis=1))
    assert kmeans_1d(x, n_clusters=5)[0].size == 5
    cb2, lab2 = kmeans_1d(np.array([1.0, 1.0, 5.0]), n_clusters=3)  # fewer distinct values
    assert cb2.size == 3 and (cb2[lab2] == [1.0, 1.0, 5.0]).all()
    e_cb, e_lab = kmeans_1d(np.zeros(0))
    assert e_cb.size == 0 and e_lab.size == 0 and e_lab.dtype == np.int64
    assert kmeans_1d(np.array([[2.0, 4.0]]), n_clusters=1)[0].tolist() == [3.0]  # read flat


def test_kmeans_on_two_values_with_many_clusters_assigns_each_its_own():
    cb, labels = kmeans_1d(np.array([0.2, 0.9, 0.2, 0.9]), n_clusters=2)
    np.testing.assert_allclose(cb, [0.2, 0.9], rtol=1e-12)
    assert labels.tolist() == [0, 1, 0, 1]


def test_qsgd_small_norms_zero_buckets_and_independent_rounding():
    rng = np.random.default_rng(7)
    levels, bucket = 4, 8
    # small values (bucket norms < 1) and an all-zero bucket
    x = np.concatenate([rng.normal(0, 0.01, 16), np.zeros(8), rng.normal(0, 0.01, 5)])
    x = x.astype(np.float32)
    reps = [
        qsgd_dequantize(*qsgd_quantize(x, levels, bucket, np.random.default_rng(s)), levels, bucket)
        for s in range(3000)
    ]
    mean = np.mean(reps, axis=0)
    norms, sym = qsgd_quantize(x, levels, bucket, rng)
    assert norms.dtype == np.float32 and norms.size == 4 and sym.dtype == np.uint8
    np.testing.assert_allclose(norms[:2], np.linalg.norm(x[:16].reshape(2, 8), axis=1), rtol=1e-6)
    assert norms[2] == 0.0 and np.all(sym[16:24] == levels)  # zero bucket -> symbol s (0)
    for r in reps[:20]:
        assert np.all(r[16:24] == 0.0) and np.all(np.isfinite(r))
        # within one level of the value, per bucket
        step = np.repeat(np.concatenate([norms, [0.0]])[:4] / levels, bucket)[: x.size]
        assert np.all(np.abs(r - x) <= step + 1e-7)
    se = np.std(reps, axis=0) / np.sqrt(len(reps)) + 1e-9
    assert np.all(np.abs(mean - x) <= 5 * se)  # unbiased for small norms too
    # coordinates round independently: 1000 values at exactly half a level
    half = np.full(1000, 1.0, np.float32)  # norm sqrt(1000); s|v|/||v|| = s / sqrt(1000)
    lv = 1000
    _, s_half = qsgd_quantize(half, lv, 1000, np.random.default_rng(1))
    frac = lv / np.sqrt(1000.0) - np.floor(lv / np.sqrt(1000.0))
    ups = np.mean(s_half.astype(np.int64) - lv > np.floor(lv / np.sqrt(1000.0)))
    assert abs(ups - frac) < 0.06  # a shared random draw would give 0 or 1
    e_norms, e_sym = qsgd_quantize(np.zeros(0), 4, 8, rng)
    assert e_norms.size == 0 and e_sym.size == 0 and e_norms.dtype == np.float32
    assert qsgd_dequantize(e_norms, e_sym, 4, 8).size == 0
    assert qsgd_quantize(np.ones(3), 200, 8, rng)[1].dtype == np.int32  # 2 s >= 256


def test_qsgd_dequantize_is_norm_times_level_over_s():
    norms = np.array([2.0, 4.0], np.float32)
    sym = np.array([4, 6, 2, 8, 0], np.uint8)  # s = 4: levels 0, 2, -2 | 4, -4
    out = qsgd_dequantize(norms, sym, 4, 3)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 1.0, -1.0, 4.0, -4.0])


def test_uniform_edges():
    lo, hi, codes = uniform_quantize(np.full(5, 2.5), 4)  # constant input
    assert lo == hi == 2.5 and codes.tolist() == [0] * 5
    np.testing.assert_array_equal(uniform_dequantize(lo, hi, codes, 4), np.full(5, 2.5))
    x = np.array([-1.0, 0.0, 1.0, 0.5])
    lo, hi, codes = uniform_quantize(x, 1)  # 1 bit: the two ends
    assert (lo, hi) == (-1.0, 1.0) and codes.tolist() == [0, 0, 1, 1]  # 0 and 0.5 round to ends
    lo, hi, codes = uniform_quantize(x, 2)  # levels -1, -1/3, 1/3, 1
    assert codes.tolist() == [0, 2, 3, 2] and codes.dtype == np.int64
    np.testing.assert_allclose(uniform_dequantize(lo, hi, codes, 2), [-1, 1 / 3, 1, 1 / 3])
    e = uniform_quantize(np.zeros(0), 8)
    assert e[:2] == (0.0, 0.0) and e[2].size == 0 and e[2].dtype == np.int64
    # float32 bounds still contain every float64 value
    y = np.array([0.1, 0.7, 1e-9 + 0.3])
    lo, hi, codes = uniform_quantize(y, 8)
    assert lo <= y.min() and hi >= y.max() and np.float32(lo) == lo and np.float32(hi) == hi
    assert np.max(np.abs(uniform_dequantize(lo, hi, codes, 8) - y)) <= (hi - lo) / 510 + 1e-12


# ---------------------------------------------------------------- error feedback state

from flwr_ext.compression import CompressionState, PipelineConfig, compress  # noqa: E402
from flwr_ext.compression.codec import decode_tensor, encode_update  # noqa: E402


def test_compress_without_error_feedback_is_the_plain_encoding():
    cfg = PipelineConfig(
        name="tq", sparsify="topk", density=0.25, quantize="qsgd", levels=15, warmup=(0.5,)
    )
    assert not cfg.error_feedback
    state = CompressionState(cfg)
    g = {"w": np.random.default_rng(0).standard_normal(400).astype(np.float32)}
    p1 = compress(state, g, server_round=1, seed=9)
    want, _ = encode_update(g, cfg, seed=9, density=0.5)  # round 1: the warm-up density
    assert p1 == want
    assert p1 != encode_update(g, cfg, seed=8, density=0.5)[0]  # the seed is used
    p2 = compress(state, g, server_round=2, seed=9)
    assert p2 == encode_update(g, cfg, seed=9, density=0.25)[0]
    assert state.residual == {} and state.velocity == {}
    assert compress(state, g)["w"] == encode_update(g, cfg, seed=0, density=0.25)[0]["w"]


def test_error_feedback_passes_ints_and_excluded_tensors_through_exactly():
    cfg = PipelineConfig(
        name="ef", sparsify="randomk", density=0.1, error_feedback=True, include=("w",)
    )
    state = CompressionState(cfg)
    rng = np.random.default_rng(1)
    g = {  # non-float and excluded tensors first: the loop must go on past them
        "steps": np.array([3, 4], np.int64),
        "bias": rng.standard_normal(7).astype(np.float32),
        "w": rng.standard_normal(300).astype(np.float32),
    }
    pay = compress(state, g, server_round=1, seed=4)
    np.testing.assert_array_equal(decode_tensor(pay["steps"]), g["steps"])
    np.testing.assert_array_equal(decode_tensor(pay["bias"]), g["bias"])
    assert set(state.residual) == {"w"}
    # random-k with error feedback uses the seed: the payload is encode(g + e) at that seed
    assert pay == encode_update(g, cfg, seed=4, density=0.1)[0]
    e1 = state.residual["w"].copy()
    pay2 = compress(state, g, server_round=2, seed=5)
    acc = {"steps": g["steps"], "bias": g["bias"], "w": g["w"] + e1}
    assert pay2 == encode_update(acc, cfg, seed=5, density=0.1)[0]


def test_residual_and_velocity_reset_when_a_tensor_changes_shape_and_keep_dtype():
    cfg = PipelineConfig(name="m", sparsify="topk", density=0.1, error_feedback=True, momentum=0.9)
    state = CompressionState(cfg)
    rng = np.random.default_rng(2)
    compress(state, {"w": rng.standard_normal(400).astype(np.float32)}, server_round=1)
    assert state.velocity["w"].dtype == np.float32 and state.residual["w"].dtype == np.float32
    assert np.any(state.velocity["w"] != 0)
    # same name, new shape (a resized layer): the old buffers must not be reused
    g = {"w": rng.standard_normal((10, 10)).astype(np.float32)}
    fresh = CompressionState(cfg)
    assert compress(state, g, server_round=2) == compress(fresh, g, server_round=2)
    np.testing.assert_array_equal(state.residual["w"], fresh.residual["w"])
    # a dtype change alone also resets them
    g64 = {"w": g["w"].astype(np.float64)}
    fresh64 = CompressionState(cfg)
    assert compress(state, g64, server_round=3) == compress(fresh64, g64, server_round=3)
    assert state.velocity["w"].dtype == np.float64


def test_global_topk_never_selects_zeros_when_few_values_are_non_zero():
    out = global_topk_indices({"a": np.array([1.0, 0.0, 0.0, 0.0]), "b": np.zeros(4)}, 0.5)
    assert out["a"].tolist() == [0] and out["b"].tolist() == []


def test_qsgd_symbols_fit_their_dtype_at_the_uint8_boundary():
    for levels in (127, 128):
        norms, sym = qsgd_quantize(
            np.array([1.0, 0, 0, 0], np.float32), levels, 4, np.random.default_rng(0)
        )
        assert int(sym.max()) == 2 * levels  # symbol 2 s must not wrap around
        assert sym.dtype == (np.uint8 if 2 * levels < 256 else np.int32)
        np.testing.assert_allclose(qsgd_dequantize(norms, sym, levels, 4), [1.0, 0, 0, 0])
