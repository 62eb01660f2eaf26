"""Staleness functions and device profiles."""

import math
import statistics

import pytest

from flwr_ext.asyncfl.clock import VirtualClock
from flwr_ext.asyncfl.profiles import DeviceProfile
from flwr_ext.staleness import constant, from_config, hinge, polynomial


def test_staleness_functions():
    assert constant()(7) == 1.0
    assert polynomial(0.5)(3) == pytest.approx(0.5)
    assert polynomial(1.0)(0) == 1.0
    h = hinge(a=10, b=4)
    assert h(4) == 1.0 and h(5) == pytest.approx(1 / 11)
    assert polynomial(0.5, max_staleness=2)(3) == 0.0
    assert from_config("polynomial", 0.5, max_staleness=-1).max_staleness is None
    with pytest.raises(ValueError):
        from_config("nope")


@pytest.mark.parametrize("kind", ["homogeneous", "normal", "exponential", "lognormal"])
def test_profile_draws_are_keyed_not_sequential(kind):
    std = 0.05 if kind == "normal" else 0.5
    p = DeviceProfile(kind, mean_step_time=0.2, std=std, jitter=0.2)
    a = [p.node(3, k).step_time for k in range(50)]
    b = [p.node(3, k).step_time for k in reversed(range(50))][::-1]
    assert a == b
    assert all(t >= p.floor for t in a)
    assert p.jitter_factor(3, 1, 5) == p.jitter_factor(3, 1, 5)
    assert 0.8 <= p.jitter_factor(3, 1, 5) <= 1.2
    if kind == "homogeneous":
        assert set(a) == {0.2}
    else:
        assert len(set(a)) == 50
        # sample mean equals the requested mean within 5 standard errors of 4,000 draws
        # (lognormal s = 0.5: SE ~ 0.0017, i.e. ~4 % at 5 sigma; a lognormal without the
        # -s^2/2 correction is 13 % high)
        big = [p.node(9, k).step_time for k in range(4000)]
        se = statistics.stdev(big) / math.sqrt(len(big))
        assert abs(statistics.fmean(big) - 0.2) <= 5 * se
        assert 5 * se < 0.2 * 0.1  # the tolerance is tighter than the bugs it guards against


def test_trace_profile(tmp_path):
    f = tmp_path / "trace.csv"
    f.write_text("node,step_time,up_mbps\n0,0.5,8\n1,2.0,1\n")
    p = DeviceProfile("trace", trace=str(f))
    assert p.node(0, 0).step_time == 0.5 and p.node(0, 3).step_time == 2.0
    assert p.node(0, 1).up_bps == 1e6


def test_virtual_clock_timing_uses_bytes_and_lower_bound_holds():
    p = DeviceProfile("exponential", mean_step_time=0.1, jitter=0.3, up_mbps=8, down_mbps=16)
    c = VirtualClock(p, seed=1)
    t = c.timing(2, 0, bytes_down=2_000_000, bytes_up=1_000_000, steps=10)
    node = p.node(1, 2)
    assert t.download == pytest.approx(node.latency + 1.0)
    assert t.upload == pytest.approx(node.latency + 1.0)
    assert t.compute == pytest.approx(10 * node.step_time * p.jitter_factor(1, 2, 0))
    for key in range(6):
        full = c.timing(key, 4, 1000, 500, 10).total
        assert c.lower_bound(key, 4, 1000, 10, range(6)) <= full
        assert c.lower_bound(None, 4, 1000, 10, range(6)) <= full
    assert math.isfinite(c.lower_bound(None, 0, 10, 1, range(0)))
