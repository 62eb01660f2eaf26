"""DP and compression, from the threat model (flwr_ext/privacy/compression.py, docs/privacy.md)."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.compression.codec import PipelineConfig, decode_update
from flwr_ext.compression.feedback import CompressionState, compress
from flwr_ext.compression.presets import PRESETS
from flwr_ext.privacy import DPCompressionError, check_dp_compression


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_allowed_under_dp_sgd_and_under_central_client_level_dp(preset):
    # record-level DP-SGD: compression is post-processing of the DP output
    check_dp_compression(preset, record_level=True, client_level=True)
    # central DP: the trusted server decodes, clips each update to C, then adds noise
    check_dp_compression(preset, record_level=False, client_level=True)
    # client-side clipping with compression_mod, which bounds the decoded norm by C
    check_dp_compression(preset, record_level=False, client_side_clipping=True)
    check_dp_compression(preset, record_level=False, client_level=False)


@pytest.mark.parametrize("preset", ["fedzip", "dgc", "qsgd-8bit", "sparse-lora"])
def test_client_side_clipping_without_a_bound_after_compression_is_refused(preset):
    with pytest.raises(DPCompressionError, match="does not\\s+clip again"):
        check_dp_compression(
            preset, record_level=False, client_side_clipping=True, clips_after_compression=False
        )
    # after DP-SGD the update is already private: still post-processing
    check_dp_compression(
        preset, record_level=True, client_side_clipping=True, clips_after_compression=False
    )
    check_dp_compression(
        "none", record_level=False, client_side_clipping=True, clips_after_compression=False
    )


def test_randomk_without_error_feedback_is_unbiased():
    """E[decode(randomk(x))] = x: the kept values are scaled by n / k (k = 50 of n = 1000)."""
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.05, error_feedback=False)
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    trials = 2000
    total = np.zeros(1000)
    for seed in range(trials):
        decoded = decode_update(compress(CompressionState(cfg), {"w": x}, seed=seed))["w"]
        assert np.count_nonzero(decoded) == 50
        np.testing.assert_allclose(decoded[decoded != 0], 20 * x[decoded != 0], rtol=1e-6)
        total += decoded
    # per coordinate: mean of `trials` draws of 20 x_i w.p. 1/20, else 0: std x_i sqrt(19 / trials)
    err = (total / trials - x) / (np.abs(x) * np.sqrt(19 / trials))
    assert np.abs(err).max() < 5.0
    assert abs(float(np.mean(total / trials - x))) < 0.02


def test_randomk_with_error_feedback_sends_the_values_unscaled():
    cfg = PipelineConfig(name="rk", sparsify="randomk", density=0.05, error_feedback=True)
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    state = CompressionState(cfg)
    decoded = decode_update(compress(state, {"w": x}, seed=3))["w"]
    kept = decoded != 0
    np.testing.assert_array_equal(decoded[kept], x[kept])  # biased; the residual holds the rest
    np.testing.assert_allclose(decoded + state.residual["w"], x)
