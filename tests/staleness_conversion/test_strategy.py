"""StaleConversion on a stand-in engine: what it converts, when, and what reaches FedBuff."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flwr_ext.asyncfl.types import Job, NodeState, Timer, Update
from flwr_ext.staleness import Staleness
from flwr_ext.staleness_conversion import ConversionRefused, InversionConfig, LocalRecipe
from flwr_ext.staleness_conversion.convert import convert_update
from flwr_ext.strategies.factory import build_strategy
from flwr_ext.strategies.fedbuff import FedBuff
from flwr_ext.strategies.stale_conversion import StaleConversion

D, C = 6, 3


def _mlp() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))


class _Engine:
    """The EngineAPI calls the wrapper and FedBuff make (no Flower)."""

    def __init__(self, params):
        self.now, self.version, self.params = 0.0, 0, params
        self.commits, self.discards, self.timers = [], [], []

    def model_at(self, version):
        raise AssertionError("the update carries its base")

    def commit(self, params, updates, metrics=None):
        self.version += 1
        self.params = params
        self.commits.append((params, updates))
        return self.version

    def discard(self, update, reason, detail=""):
        self.discards.append((update, reason))

    def set_timer(self, at, payload=None):
        t = Timer(max(at, self.now), len(self.timers), payload)
        self.timers.append(t)
        return t

    def cancel_timer(self, timer):
        timer.cancelled = True


def _update(staleness: int, base, delta) -> Update:
    node = NodeState(node_id=1, rank=0, key=0)
    job = Job(node, 0, 0, "m", {}, 3, 0.0, 0.0, 0, 0.0)
    return Update(job, 10.0, {}, 3, 0.0, 0, staleness=staleness, base=base, _delta=delta)


@pytest.fixture
def setup():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    params = {k: v.detach().numpy().copy() for k, v in _mlp().named_parameters()}
    current = {k: v + 0.2 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    delta = {k: 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    recipe = LocalRecipe(steps=5, lr=0.1)  # steps replaced by the update's num_steps (3)
    cfg = InversionConfig(num_samples=8, iterations=30, input_low=None, input_high=None)
    inner = FedBuff(buffer_size=1, staleness=Staleness("constant"))
    strat = StaleConversion(
        inner, _mlp, recipe, (D,), C, threshold=2, config=cfg, max_residual=10.0
    )
    return strat, params, current, delta, recipe, cfg


def test_fresh_updates_pass_stale_ones_are_converted_after_their_cost(setup) -> None:
    strat, params, current, delta, recipe, cfg = setup
    eng = _Engine(current)
    strat.on_start(eng)
    strat.on_update(eng, _update(2, params, delta))  # staleness 2 <= threshold: straight on
    assert len(eng.commits) == 1 and not eng.timers
    np.testing.assert_allclose(eng.params["0.weight"], current["0.weight"] + delta["0.weight"])

    at_start = eng.params
    strat.on_update(eng, _update(7, params, delta))  # staleness 7: converted, not yet applied
    assert len(eng.commits) == 1 and len(eng.timers) == 1
    timer = eng.timers[0]
    assert timer.at > 0.0  # the conversion's measured CPU time, charged to the clock
    eng.now = timer.at
    strat.on_timer(eng, timer)
    assert len(eng.commits) == 2
    _, (fresh,) = eng.commits[1]
    assert fresh.staleness == 0 and fresh.base is at_start
    expected = convert_update(
        _mlp,
        LocalRecipe(steps=3, lr=0.1),
        params,
        delta,
        at_start,
        input_shape=(D,),
        num_classes=C,
        config=cfg,
        stream=0,
    )
    for k in params:
        np.testing.assert_allclose(eng.params[k], at_start[k] + expected.delta[k], atol=1e-6)
    (row,) = strat.conversions
    assert row["staleness"] == 7 and row["accepted"] == 1.0 and row["seconds"] == timer.at


def test_rejected_conversion_falls_back_and_pending_ones_are_discarded(setup) -> None:
    strat, params, current, delta, *_ = setup
    strat.max_residual = 1e-9  # nothing passes: the raw stale update goes to FedBuff
    eng = _Engine(current)
    strat.on_start(eng)
    stale = _update(9, params, delta)
    strat.on_update(eng, stale)
    strat.on_timer(eng, eng.timers[0])
    (_, (applied,)) = eng.commits[0]
    assert applied is stale and strat.conversions[0]["accepted"] == 0.0
    strat.on_update(eng, _update(9, params, delta))  # still converting when the run ends
    strat.on_finish(eng)
    assert [r for _, r in eng.discards] == ["stale conversion still running at the end"]


def test_refusals_and_factory() -> None:
    bn = lambda: nn.Sequential(nn.Linear(D, 4), nn.BatchNorm1d(4))  # noqa: E731
    with pytest.raises(ConversionRefused, match="BatchNorm1d"):
        StaleConversion(FedBuff(), bn, LocalRecipe(steps=1, lr=0.1), (D,), C)
    with pytest.raises(ConversionRefused, match="secure aggregation"):
        StaleConversion(FedBuff(), _mlp, LocalRecipe(1, 0.1), (D,), C, secure_aggregation=True)
    cfg = {
        "strategy": "fedbuff",
        "stale-conversion": True,
        "stale-conversion-threshold": 4,
        "local-steps": 5,
        "learning-rate": 0.05,
        "batch-size": 16,
        "momentum": 0.9,
    }
    strat = build_strategy(cfg)
    assert isinstance(strat, StaleConversion) and isinstance(strat.inner, FedBuff)
    assert strat.threshold == 4 and strat.recipe == LocalRecipe(5, 0.05, 16, 0.9)
    assert strat.needs_weights and not strat.background
    with pytest.raises(ConversionRefused, match="differential privacy"):
        build_strategy({**cfg, "dp.target-epsilon": 8.0})
    assert isinstance(build_strategy({**cfg, "stale-conversion": False}), FedBuff)
