"""Server optimizers (flwr_ext.asyncfl.server_opt): every step computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.server_opt import (
    AdaptiveBraking,
    Momentum,
    Nesterov,
    Plain,
    ServerOptimizer,
    cosine,
    make_server_opt,
)
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.staleness import polynomial
from flwr_ext.strategies import FedAsync, FedBuff
from flwr_ext.strategies.factory import build_strategy

from .helpers import init_arrays, random_client, shift_client


def p(w, b):
    return {"w": np.asarray(w, np.float32), "b": np.asarray(b, np.float32)}


X0 = p([1.0, 2.0], [0.0])
S1 = p([1.0, 0.0], [0.0])
S2 = p([1.0, 1.0], [0.0])


def close(a, b):
    for k in b:
        np.testing.assert_allclose(a[k], np.asarray(b[k], np.float64), rtol=1e-6, atol=1e-7)


def test_plain_step():
    opt = Plain(0.5)
    close(opt.step(X0, p([2.0, -2.0], [4.0])), {"w": [2.0, 1.0], "b": [2.0]})
    assert isinstance(opt, ServerOptimizer)


def test_momentum_two_steps():
    opt = Momentum(lr=0.5, beta=0.9)
    x1 = opt.step(X0, S1)  # m = s1
    close(x1, {"w": [1.5, 2.0], "b": [0.0]})
    x2 = opt.step(x1, S2)  # m = s2 + 0.9 s1 = [1.9, 1]
    close(opt.buffer, {"w": [1.9, 1.0], "b": [0.0]})
    close(x2, {"w": [1.5 + 0.95, 2.5], "b": [0.0]})
    opt.reset()
    assert opt.buffer is None


def test_nesterov_two_steps():
    opt = Nesterov(lr=0.5, beta=0.5)
    x1 = opt.step(X0, S1)  # m = s1; x + 0.5 (s1 + 0.5 s1)
    close(x1, {"w": [1.75, 2.0], "b": [0.0]})
    x2 = opt.step(x1, S2)  # m = s2 + 0.5 s1 = [1.5, 1]; x + 0.5 (s2 + 0.5 m)
    close(opt.buffer, {"w": [1.5, 1.0], "b": [0.0]})
    close(x2, {"w": [1.75 + 0.5 * 1.75, 2.0 + 0.5 * 1.5], "b": [0.0]})


def test_adaptive_braking_brakes_along_and_boosts_against_the_velocity():
    opt = AdaptiveBraking(lr=1.0, beta=0.5, rho=1.0)
    x1 = opt.step(X0, S1)  # no velocity yet: cos = 0, u = s1
    assert opt.last_cosine == 0.0
    close(x1, {"w": [2.0, 2.0], "b": [0.0]})
    x2 = opt.step(x1, S2)  # cos(s2, u) = 1/sqrt2: u = 0.5 s1 + (1 - 1/sqrt2) s2
    c = 1 / math.sqrt(2)
    assert opt.last_cosine == pytest.approx(c)
    u2 = [0.5 + (1 - c), 1 - c]
    close(opt.buffer, {"w": u2, "b": [0.0]})
    close(x2, {"w": [2.0 + u2[0], 2.0 + u2[1]], "b": [0.0]})
    # a step against the velocity (cos = -1) is amplified by 1 + rho
    back = {k: -v for k, v in opt.buffer.items()}
    opt.step(x2, back)
    assert opt.last_cosine == pytest.approx(-1.0)
    close(opt.buffer, {"w": [0.5 * u2[0] - 2 * u2[0], 0.5 * u2[1] - 2 * u2[1]], "b": [0.0]})


def test_adaptive_braking_cosine_is_over_the_whole_model():
    # per tensor: w aligned (1), b orthogonal to a zero velocity part; over the model 1/sqrt2
    assert cosine(p([1.0, 0.0], [1.0]), p([1.0, 0.0], [0.0])) == pytest.approx(2**-0.5)
    assert cosine(p([0.0, 0.0], [0.0]), S1) == 0.0
    opt = AdaptiveBraking(lr=1.0, beta=0.9, rho=2.0)
    opt.step(X0, S1)
    opt.step(X0, p([1.0, 0.0], [1.0]))  # brake 1 - 2/sqrt2
    b = 1 - 2 * 2**-0.5
    close(opt.buffer, {"w": [0.9 + b, 0.0], "b": [b]})


def test_rho_zero_is_momentum():
    ab, m = AdaptiveBraking(lr=0.3, beta=0.8, rho=0.0), Momentum(lr=0.3, beta=0.8)
    xa = xm = X0
    for s in (S1, S2, S1):
        xa, xm = ab.step(xa, s), m.step(xm, s)
    close(xa, xm)


def test_make_server_opt_and_validation():
    assert isinstance(make_server_opt("plain", lr=0.5), Plain)
    assert isinstance(make_server_opt("Momentum"), Momentum)
    ab = make_server_opt("adaptive-braking", lr=0.2, beta=0.7, rho=1.5)
    assert (ab.lr, ab.beta, ab.rho) == (0.2, 0.7, 1.5)
    assert isinstance(make_server_opt("nesterov"), Nesterov)
    with pytest.raises(ValueError, match="unknown server optimizer"):
        make_server_opt("adam")
    with pytest.raises(ValueError):
        Momentum(lr=1.0, beta=1.0)
    with pytest.raises(ValueError):
        Plain(lr=0.0)
    with pytest.raises(ValueError):
        AdaptiveBraking(rho=-1.0)


def _vclock():
    return VirtualClock(DeviceProfile("homogeneous", mean_step_time=0.1, latency=0.0), seed=0)


def test_fedbuff_momentum_arguments_equal_momentum_optimizer_bit_for_bit():
    def run(strategy):
        res = strategy.start(
            FakeGrid(random_client, 4, seed=1),
            init_arrays(),
            num_rounds=5,
            clock=_vclock(),
            poll_interval=0,
        )
        return {k: res.arrays[k].numpy() for k in ("w", "b")}

    old = run(FedBuff(buffer_size=2, server_lr=0.7, server_momentum=0.9))
    new = run(FedBuff(buffer_size=2, server_opt=Momentum(0.7, 0.9)))
    for k in old:
        assert np.array_equal(old[k], new[k])
    with pytest.raises(ValueError, match="either server_opt"):
        FedBuff(server_momentum=0.9, server_opt=Plain(1.0))


def test_fedasync_momentum_on_the_mix_step_by_hand():
    res = FedAsync(alpha=0.6, staleness=polynomial(0.5), server_opt=Momentum(1.0, 0.5)).start(
        FakeGrid(shift_client, 2, seed=3),
        init_arrays(),
        num_rounds=2,
        clock=_vclock(),
        poll_interval=0,
    )
    # as test_fedasync_steps_by_hand: step 1 = 0.6 (1 - 0); m1 = 0.6, x1 = 0.6
    x1 = m1 = 0.6
    a2 = 0.6 * 2**-0.5  # node 1 (delta 2 on version 0) arrives at staleness 1
    m2 = a2 * (2.0 - x1) + 0.5 * m1
    np.testing.assert_allclose(res.arrays["w"].numpy(), np.full((3, 4), x1 + m2), rtol=1e-6)


def test_factory_server_opt_keys():
    cfg = {"strategy": "fedbuff", "server-opt": "adaptive-braking", "server-lr": 0.5}
    s = build_strategy({**cfg, "server-opt-beta": 0.8, "server-opt-rho": 1.0})
    assert isinstance(s.server_opt, AdaptiveBraking)
    assert (s.server_opt.lr, s.server_opt.beta, s.server_opt.rho) == (0.5, 0.8, 1.0)
    assert isinstance(build_strategy({"strategy": "fedbuff"}).server_opt, Plain)
    s = build_strategy({"strategy": "fedasync", "server-opt": "nesterov"})
    assert isinstance(s.server_opt, Nesterov)
    assert build_strategy({"strategy": "fedasync"}).server_opt is None
