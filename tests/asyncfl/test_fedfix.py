"""FedFix on an in-process Grid: ticks, weights d_i = ceil(tau_i/dt) p_i and dispatch, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.server_opt import Momentum
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.strategies import FedFix
from flwr_ext.strategies.factory import build_strategy

from .helpers import init_arrays, shift_client

# node 0 takes 5 steps * 0.3 s = 1.5 s, nodes 1 and 2 take 0.5 s (plus ~1e-5 s of transfers)
PROFILE = DeviceProfile(
    "intertwined", mean_step_time=0.1, latency=0.0, slow_nodes=1, slow_factor=3.0
)


def run(strategy, rounds=2):
    return strategy.start(
        FakeGrid(shift_client, 3, seed=2),
        init_arrays(),
        num_rounds=rounds,
        clock=VirtualClock(PROFILE, seed=0),
        poll_interval=0,
    )


def w(res):
    return res.arrays["w"].numpy()


def test_fedfix_ticks_by_hand():
    res = run(FedFix(dt=1.0))
    # tick 1 (t = 1): nodes 1, 2 are done (deltas 2, 3; ceil(0.5 / 1) = 1, p = 1/3)
    x1 = (2 + 3) / 3
    # they get x1 and are back at 1.5; node 0 (delta 1 on version 0) finishes at 1.5:
    # tick 2: d_0 = ceil(1.5 / 1) / 3 = 2/3
    x2 = x1 + 2 / 3 * 1 + (2 + 3) / 3
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-6)
    m = res.train_metrics_clientapp
    assert m[1]["tick"] == 1 and m[2]["tick"] == 2
    assert m[1]["num-updates"] == 2 and m[2]["num-updates"] == 3
    assert m[1]["sum-weights"] == pytest.approx(2 / 3)
    assert m[2]["sum-weights"] == pytest.approx(4 / 3)
    # only the tick's set got the model of tick 1 (node 0 was still computing)
    sent = {k: [r.version_sent for r in res.updates if r.node == k] for k in range(3)}
    assert sent == {0: [0], 1: [0, 1], 2: [0, 1]}


def test_fedfix_asynchronous_weights_by_hand():
    res = run(FedFix(dt=1.0, weights="asynchronous"))
    # d_i = (sum_j 1/tau_j) tau_i p_i over the nodes with an estimate
    x1 = (1 / 0.5 + 1 / 0.5) * 0.5 / 3 * (2 + 3)  # tick 1: nodes 1, 2 known
    inv = 1 / 1.5 + 2 / 0.5  # tick 2: node 0 known as well
    x2 = x1 + inv * 1.5 / 3 * 1 + inv * 0.5 / 3 * (2 + 3)
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-3)


def test_fedfix_sample_weighted_and_server_opt():
    res = run(FedFix(dt=1.0, weighted_by_key="num-examples", server_opt=Momentum(1.0, 0.5)))
    # n_i = 10 (pid + 1); tick 1 knows n_1 = 20, n_2 = 30: step 1 = (20*2 + 30*3) / 50
    m1 = (20 * 2 + 30 * 3) / 50
    # tick 2: n = 60; step 2 = 2 * 10/60 * 1 + 20/60 * 2 + 30/60 * 3
    s2 = 2 * 10 / 60 + 20 / 60 * 2 + 30 / 60 * 3
    x2 = m1 + (s2 + 0.5 * m1)
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-6)


def test_fedfix_tau_estimate_is_a_moving_average():
    s = FedFix(dt=1.0, tau_momentum=0.5)
    res = run(s, rounds=3)
    est = sorted(s._tau.values())
    for key in (1, 0):  # fast node 1: several jobs; slow node 0: its jobs
        durations = [r.duration for r in res.finished if r.node == key]
        tau = durations[0]
        for d in durations[1:]:
            tau = 0.5 * tau + 0.5 * d
        assert any(t == pytest.approx(tau, rel=1e-12) for t in est)
    assert est[-1] == pytest.approx(1.5, rel=1e-3)  # node 0's 5 steps * 0.3 s


def test_fedfix_validation_and_factory():
    with pytest.raises(ValueError):
        FedFix(dt=0.0)
    with pytest.raises(ValueError):
        FedFix(weights="fedbuff")
    with pytest.raises(ValueError):
        FedFix(server_lr=0.5, server_opt=Momentum(1.0, 0.9))
    s = build_strategy({"strategy": "fedfix", "fedfix-dt": 2.5, "fedfix-weights": "asynchronous",
                        "fedfix-importance": "uniform", "server-lr": 0.7})  # fmt: skip
    assert isinstance(s, FedFix)
    assert (s.dt, s.weights, s.weighted_by_key, s.server_opt.lr) == (2.5, "asynchronous", None, 0.7)
