"""Staleness weights at their boundaries, parameters passed through, documented defaults.

Written to kill the mutants that survived ``make mutate`` in ``flwr_ext/staleness.py``
(docs/testing.md): a hinge that starts one step early, a slope that divides, helpers that drop
``max_staleness`` or ``a``, and changed defaults all passed the older tests.
"""

from __future__ import annotations

import pytest

from flwr_ext.staleness import Staleness, constant, from_config, hinge, polynomial


def test_hinge_is_flat_up_to_b_inclusive_then_falls_as_one_over_a_times_excess():
    h = hinge(a=2.0, b=3)
    assert [h(s) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]
    assert h(4) == pytest.approx(1 / 3)  # 1 / (2 * 1 + 1)
    assert h(6) == pytest.approx(1 / 7)  # 1 / (2 * 3 + 1)
    assert hinge(a=0.0, b=0)(9) == 1.0


def test_polynomial_values_and_exponent():
    assert polynomial(2.0)(3) == pytest.approx(1 / 16)
    assert polynomial(0.0)(100) == 1.0
    assert polynomial(1.0)(1) == pytest.approx(0.5)
    assert Staleness("polynomial", a=0.5)(8) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "make", [lambda m: constant(m), lambda m: polynomial(0.5, m), lambda m: hinge(10, 4, m)]
)
def test_every_helper_keeps_its_cut_off(make):
    w = make(2)
    assert w.max_staleness == 2
    assert w(2) > 0.0 and w(3) == 0.0
    assert make(None)(1000) >= 0.0 and make(None).max_staleness is None


def test_documented_defaults():
    # FedBuff's 1 / sqrt(1 + s); Xie et al.'s hinge a = 10, b = 4 (module docstring)
    assert polynomial() == Staleness("polynomial", a=0.5, b=4, max_staleness=None)
    assert hinge() == Staleness("hinge", a=10.0, b=4, max_staleness=None)
    assert Staleness() == Staleness("polynomial", 0.5, 4, None)
    assert constant() == Staleness("constant", max_staleness=None)
    assert from_config("hinge") == Staleness("hinge", a=0.5, b=4, max_staleness=None)


def test_from_config_passes_everything_through():
    assert from_config("hinge", 3.0, 7, 9) == Staleness("hinge", 3.0, 7, 9)
    assert from_config("polynomial", 0.5, max_staleness=0).max_staleness == 0  # 0 is a cut-off
    assert from_config("polynomial", 0.5, max_staleness=0)(1) == 0.0
    assert from_config("constant", max_staleness=-1).max_staleness is None


def test_validation_messages():
    with pytest.raises(ValueError, match="unknown staleness function 'nope'"):
        Staleness("nope")
    with pytest.raises(ValueError, match="a must be >= 0"):
        Staleness("polynomial", a=-0.1)
    assert Staleness("polynomial", a=0.0)(5) == 1.0  # a = 0 is allowed
    with pytest.raises(ValueError, match="negative staleness -1"):
        constant()(-1)


def test_from_run_config_reads_every_key_with_per_function_defaults():
    from flwr_ext.staleness import from_run_config

    assert from_run_config({}) == Staleness("polynomial", 0.5, 4, None)
    assert from_run_config({"staleness": "hinge"}) == Staleness("hinge", 10.0, 4, None)
    assert from_run_config({"staleness": "constant"}) == Staleness("constant", 0.5, 4, None)
    cfg = {"staleness": "hinge", "staleness-a": 2.0, "staleness-b": 6, "max-staleness": 9}
    assert from_run_config(cfg) == Staleness("hinge", 2.0, 6, 9)
    assert from_run_config({"max-staleness": 0}).max_staleness == 0
    assert from_run_config({"max-staleness": -1}).max_staleness is None
