"""random-k: unbiased (scaled by n/k) without error feedback, unscaled (biased) with it."""

from __future__ import annotations

import numpy as np

from flwr_ext.compression import CompressionState, PipelineConfig, compress
from flwr_ext.compression.codec import decode_tensor, encode_update
from flwr_ext.compression.sparsify import k_for

X = np.random.default_rng(3).standard_normal(50).astype(np.float64)


def test_random_k_without_error_feedback_scales_the_kept_values_by_n_over_k() -> None:
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.2)  # k = 10 of 50
    assert k_for(50, 0.2) == 10
    out = decode_tensor(compress(CompressionState(cfg), {"w": X}, seed=11)["w"])
    mask = out != 0
    assert mask.sum() == 10
    np.testing.assert_array_equal(out[mask], X[mask] * 5.0)  # n / k = 5, exactly
    # the same mask as the unscaled encoding at that seed: only the values change
    plain = decode_tensor(encode_update({"w": X}, cfg, seed=11)[0]["w"])
    np.testing.assert_array_equal(plain != 0, mask)
    np.testing.assert_array_equal(plain[mask], X[mask])


def test_random_k_without_error_feedback_is_unbiased() -> None:
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.2)
    seeds = 2000
    total = np.zeros_like(X)
    for s in range(seeds):
        total += decode_tensor(compress(CompressionState(cfg), {"w": X}, seed=s)["w"])
    mean = total / seeds
    # per coordinate: Var = x^2 (n/k - 1) / seeds -> std = |x| * 2 / sqrt(4000) = 0.045 |x|
    np.testing.assert_allclose(mean, X, atol=5 * 2 * np.abs(X).max() / np.sqrt(seeds))
    assert abs(mean.sum() - X.sum()) < 0.05 * np.abs(X).sum()


def test_random_k_with_error_feedback_is_unscaled_and_biased() -> None:
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.2, error_feedback=True)
    state = CompressionState(cfg)
    out = decode_tensor(compress(state, {"w": X}, seed=11)["w"])
    mask = out != 0
    np.testing.assert_array_equal(out[mask], X[mask])  # no n/k: the residual keeps the rest
    np.testing.assert_array_equal(state.residual["w"], np.where(mask, 0.0, X))
    # one round's expectation is (k/n) x, not x: biased (the residual pays it back later)
    mean = np.mean(
        [
            decode_tensor(compress(CompressionState(cfg), {"w": X}, seed=s)["w"])
            for s in range(1000)
        ],
        axis=0,
    )
    np.testing.assert_allclose(mean, 0.2 * X, atol=5 * 0.4 * np.abs(X).max() / np.sqrt(1000))


def test_dense_small_tensors_are_not_scaled() -> None:
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.2, dense_below=100)
    out = decode_tensor(compress(CompressionState(cfg), {"w": X}, seed=1)["w"])
    np.testing.assert_array_equal(out, X)  # 50 < 100: sent dense, exactly
