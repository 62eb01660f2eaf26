"""DGC as in Lin et al. (ICLR 2018), one step at a time by hand on small arrays.

Momentum correction ``u <- m u + g; v <- v + u``, momentum factor masking of ``u`` and ``v``
where sent, local gradient clipping before accumulation, and the warm-up density per step.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from flwr_ext.compression import CompressionState, ConfigError, compress, get_preset
from flwr_ext.compression.codec import decode_tensor
from flwr_ext.compression.feedback import DGCConfig, clip_update
from flwr_ext.compression.presets import DGC_WARMUP


def _cfg(**kw) -> DGCConfig:
    base = dict(name="dgc", sparsify="topk", density=0.25, quantize="none", error_feedback=True)
    return DGCConfig(**{**base, **kw})


def _sent(payloads: dict[str, bytes]) -> np.ndarray:
    return decode_tensor(payloads["w"])


def test_dgc_preset_is_the_papers() -> None:
    cfg = get_preset("dgc")
    assert isinstance(cfg, DGCConfig)
    assert cfg.density == 0.001 and cfg.momentum == 0.9 and cfg.momentum_masking
    assert cfg.warmup == DGC_WARMUP == (0.25, 0.0625, 0.015625, 0.004)
    assert cfg.error_feedback and cfg.sparsify == "topk" and cfg.quantize == "none"
    # sparsity 75 %, 93.75 %, 98.4375 %, 99.6 %, then 99.9 %
    assert [1 - d for d in (*cfg.warmup, cfg.density)] == pytest.approx(
        [0.75, 0.9375, 0.984375, 0.996, 0.999]
    )
    old = get_preset("dgc:density=0.005,momentum=0,warmup=none")
    assert (old.density, old.momentum, old.warmup) == (0.005, 0.0, ())


def test_momentum_correction_and_masking_two_steps_by_hand() -> None:
    """m = 0.5, top-1 of 4 coordinates; every buffer value written out."""
    cfg = _cfg(momentum=0.5)
    state = CompressionState(cfg)
    g1 = np.array([4.0, -1.0, 2.0, 0.5])
    # step 1: u = g1, v = g1 -> send coordinate 0 (4.0); mask u and v there
    s1 = _sent(compress(state, {"w": g1}, server_round=1))
    np.testing.assert_array_equal(s1, [4.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(state.velocity["w"], [0.0, -1.0, 2.0, 0.5])  # u masked
    np.testing.assert_array_equal(state.residual["w"], [0.0, -1.0, 2.0, 0.5])  # v masked
    # step 2: g2; u = 0.5 * u + g2, v = v + u
    g2 = np.array([1.0, -2.0, 1.0, 0.5])
    u2 = np.array([0.0 + 1.0, -0.5 - 2.0, 1.0 + 1.0, 0.25 + 0.5])  # [1, -2.5, 2, 0.75]
    v2 = np.array([0.0, -1.0, 2.0, 0.5]) + u2  # [1, -3.5, 4, 1.25]
    s2 = _sent(compress(state, {"w": g2}, server_round=2))
    np.testing.assert_array_equal(s2, [0.0, 0.0, 4.0, 0.0])
    np.testing.assert_array_equal(state.velocity["w"], u2 * [1, 1, 0, 1])
    np.testing.assert_array_equal(state.residual["w"], v2 * [1, 1, 0, 1])
    # step 3: g3 = 0; the stale velocity alone drives the accumulation
    u3 = 0.5 * (u2 * [1, 1, 0, 1])  # [0.5, -1.25, 0, 0.375]
    v3 = v2 * [1, 1, 0, 1] + u3  # [1.5, -4.75, 0, 1.625]
    s3 = _sent(compress(state, {"w": np.zeros(4)}, server_round=3))
    np.testing.assert_array_equal(s3, [0.0, -4.75, 0.0, 0.0])
    np.testing.assert_array_equal(state.velocity["w"], u3 * [1, 0, 1, 1])
    np.testing.assert_array_equal(state.residual["w"], v3 * [1, 0, 1, 1])


def test_without_momentum_factor_masking_only_v_is_reset() -> None:
    cfg = _cfg(momentum=0.5, momentum_masking=False)
    state = CompressionState(cfg)
    g1 = np.array([4.0, -1.0, 2.0, 0.5])
    compress(state, {"w": g1}, server_round=1)
    np.testing.assert_array_equal(state.velocity["w"], g1)  # u keeps the sent coordinate
    np.testing.assert_array_equal(state.residual["w"], [0.0, -1.0, 2.0, 0.5])
    s2 = _sent(compress(state, {"w": np.zeros(4)}, server_round=2))
    # u = 0.5 g1 = [2, -0.5, 1, 0.25]; v = [0, -1, 2, 0.5] + u = [2, -1.5, 3, 0.75]
    np.testing.assert_array_equal(s2, [0.0, 0.0, 3.0, 0.0])
    np.testing.assert_array_equal(state.velocity["w"], [2.0, -0.5, 1.0, 0.25])
    np.testing.assert_array_equal(state.residual["w"], [2.0, -1.5, 0.0, 0.75])


def test_local_gradient_clipping_before_accumulation() -> None:
    # ||g|| = 5 over both tensors (3-4-0); clip to 2.5 halves every coordinate
    g = {"w": np.array([3.0, 0.0, 0.0, 0.0]), "b": np.array([4.0])}
    clipped = clip_update(g, {"w", "b"}, 2.5)
    np.testing.assert_array_equal(clipped["w"], [1.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(clipped["b"], [2.0])
    np.testing.assert_array_equal(clip_update(g, {"w", "b"}, 5.0)["b"], g["b"])  # at: kept
    np.testing.assert_array_equal(clip_update(g, {"w", "b"}, 6.0)["w"], g["w"])  # below: kept
    np.testing.assert_array_equal(clip_update(g, {"w", "b"}, 0.0)["b"], g["b"])  # 0: off
    np.testing.assert_array_equal(clip_update(g, {"w"}, 1.5)["b"], g["b"])  # not in names
    np.testing.assert_array_equal(clip_update(g, {"w"}, 1.5)["w"], [1.5, 0.0, 0.0, 0.0])
    # in compress: clipped first, then u = m u + clip(g), v = v + u
    cfg = _cfg(momentum=0.5, clip_norm=2.5, density=0.5)
    state = CompressionState(cfg)
    g1 = {"w": np.array([3.0, 0.0, 0.0, 4.0])}  # norm 5 -> [1.5, 0, 0, 2]
    s1 = _sent(compress(state, g1, server_round=1))
    np.testing.assert_array_equal(s1, [1.5, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(state.residual["w"], np.zeros(4))
    g2 = {"w": np.array([0.0, 0.6, 0.8, 0.0])}  # norm 1 < 2.5: unclipped
    s2 = _sent(compress(state, g2, server_round=2))
    np.testing.assert_array_equal(s2, [0.0, 0.6, 0.8, 0.0])
    # integer tensors are never clipped
    cfg_int = _cfg(clip_norm=1.0, density=1.0)
    st = CompressionState(cfg_int)
    pay = compress(st, {"w": np.array([30.0, 40.0]), "n": np.array([7, 7])}, server_round=1)
    np.testing.assert_allclose(decode_tensor(pay["w"]), [0.6, 0.8])
    np.testing.assert_array_equal(decode_tensor(pay["n"]), [7, 7])
    with pytest.raises(ConfigError):
        _cfg(clip_norm=-1.0)
    with pytest.raises(ConfigError):
        _cfg(clip_norm=float("inf"))


def test_warmup_density_per_step_with_the_dgc_preset() -> None:
    cfg = dataclasses.replace(get_preset("dgc"), momentum=0.0)  # count what each step keeps
    state = CompressionState(cfg)
    x = {"w": np.random.default_rng(0).standard_normal(100_000).astype(np.float32)}
    kept = [int(np.count_nonzero(_sent(compress(state, x, server_round=t)))) for t in range(1, 8)]
    # 25 %, 6.25 %, 1.5625 %, 0.4 %, then 0.1 % from the 5th step on
    assert kept == [25_000, 6_250, 1_563, 400, 100, 100, 100]


def test_spec_overrides_of_the_dgc_fields() -> None:
    cfg = get_preset("dgc:clip_norm=0.5,momentum_masking=false,warmup=0.5/0.1")
    assert (cfg.clip_norm, cfg.momentum_masking, cfg.warmup) == (0.5, False, (0.5, 0.1))
    assert get_preset("dgc:warmup=0.3").warmup == (0.3,)
    assert get_preset("dgc", warmup=None).warmup == ()
    with pytest.raises(ConfigError):
        get_preset("dgc:warmup=fast")
