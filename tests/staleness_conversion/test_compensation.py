"""The baselines of the conversion as strategy options: 2^(-tau/20) weights and DC-ASGD."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.asyncfl.types import Job, NodeState, Update
from flwr_ext.settings import ASYNC_ENGINE, validate
from flwr_ext.staleness import Staleness, exponential, from_run_config
from flwr_ext.staleness_conversion.compensate import exp2_weight
from flwr_ext.strategies.delay_compensation import DelayCompensation
from flwr_ext.strategies.factory import build_strategy
from flwr_ext.strategies.fedasync import FedAsync
from flwr_ext.strategies.fedbuff import FedBuff


class _Engine:
    def __init__(self, params):
        self.now, self.version, self.params, self.commits = 0.0, 0, params, []

    def model_at(self, version):
        raise AssertionError("the update carries its base")

    def commit(self, params, updates, metrics=None):
        self.version += 1
        self.params = params
        self.commits.append((params, updates))
        return self.version


def _update(staleness: int, base, delta) -> Update:
    job = Job(NodeState(node_id=1, rank=0, key=0), 0, 0, "m", {}, 3, 0.0, 0.0, 0, 0.0)
    return Update(job, 10.0, {}, 3, 0.0, 0, staleness=staleness, base=base, _delta=delta)


def test_exponential_weight_is_the_references_2_to_minus_tau_over_20() -> None:
    w = from_run_config({"staleness": "exponential"})
    assert w == exponential(20.0) == Staleness("exponential", a=20.0)
    for tau in (0, 1, 20, 40, 137):
        assert w(tau) == pytest.approx(2.0 ** (-tau / 20)) == exp2_weight(tau)
    assert exponential(10.0, max_staleness=5)(6) == 0.0
    with pytest.raises(ValueError, match="half-life"):
        Staleness("exponential", a=0.0)
    validate({"staleness": "exponential", "staleness-a": 20.0}, ASYNC_ENGINE)


def test_dc_asgd_compensates_stale_deltas_only() -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(3, 4)).astype(np.float32)}
    current = {"w": base["w"] + rng.normal(size=(3, 4)).astype(np.float32)}
    delta = {"w": 0.5 * rng.normal(size=(3, 4)).astype(np.float32)}
    strat = DelayCompensation(FedBuff(buffer_size=1, staleness=Staleness("constant")), lam=4.0)
    eng = _Engine(current)
    strat.on_start(eng)
    strat.on_update(eng, _update(0, current, delta))  # fresh: unchanged
    np.testing.assert_allclose(eng.params["w"], current["w"] + delta["w"], rtol=1e-6)
    now = eng.params
    strat.on_update(eng, _update(30, base, delta))  # stale: Delta - lam Delta^2 (w^t - w^{t-tau})
    expected = delta["w"] - 4.0 * delta["w"] ** 2 * (now["w"] - base["w"])
    np.testing.assert_allclose(eng.params["w"], now["w"] + expected, rtol=1e-5, atol=1e-6)
    (_, (applied,)) = eng.commits[1]
    assert applied.staleness == 30 and applied.base is base


def test_dc_asgd_under_fedasync_mixes_the_compensated_model() -> None:
    base = {"w": np.zeros(2, np.float32)}
    current = {"w": np.ones(2, np.float32)}
    delta = {"w": np.full(2, 0.5, np.float32)}
    strat = DelayCompensation(FedAsync(alpha=1.0, staleness=Staleness("constant")), lam=2.0)
    eng = _Engine(current)
    strat.on_update(eng, _update(5, base, delta))
    # x_new = base + Delta - 2 * 0.25 * (1 - 0) = 0.5 - 0.5 = 0; alpha 1: the model becomes x_new
    np.testing.assert_allclose(eng.params["w"], 0.0, atol=1e-7)


def test_factory_and_settings() -> None:
    cfg = {"strategy": "fedbuff", "staleness": "constant", "dc-asgd-lambda": 4.0}
    strat = build_strategy(cfg)
    assert isinstance(strat, DelayCompensation) and strat.lam == 4.0
    assert isinstance(strat.inner, FedBuff) and strat.needs_weights
    assert isinstance(build_strategy({**cfg, "dc-asgd-lambda": 0.0}), FedBuff)
    validate(cfg, ASYNC_ENGINE)
    with pytest.raises(ValueError):
        validate({**cfg, "dc-asgd-lambda": -1.0}, ASYNC_ENGINE)
    with pytest.raises(ValueError):
        DelayCompensation(FedBuff(), lam=-1.0)
