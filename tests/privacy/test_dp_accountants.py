"""RDP, PRV and PLD epsilons against independent computations, and in Flower 1.42's types.

Independent references: Google's dp-accounting directly (its RDP and PLD accountants, as Flower's
``RdpAccountant`` wraps them), and for q = 1 the exact privacy profile of the Gaussian mechanism
(Balle & Wang, ICML 2018, Theorem 8): k compositions of sigma are one Gaussian with
mu = sqrt(k) / sigma, delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2).
"""

from __future__ import annotations

import math

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from flwr_ext.privacy import AccountantState, DPConfig, DPLoRAEngine, calibrate_noise
from flwr_ext.privacy import compute_epsilon as eps_of

dp_accounting = pytest.importorskip("dp_accounting")


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2))


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """Tight epsilon of ``steps`` Gaussian mechanisms (q = 1), by bisection on delta(eps)."""
    mu = math.sqrt(steps) / sigma

    def delta_of(eps: float) -> float:
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def _google(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = (
        dp_accounting.pld.PLDAccountant()
        if accountant == "pld"
        else dp_accounting.rdp.RdpAccountant()
    )
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def test_issue_figures_sigma_05793_q_1_13_9_steps():
    h = [(0.5793, 1 / 13, 9)]
    assert eps_of(h, 1e-5, "rdp") == pytest.approx(9.01, abs=0.01)
    assert eps_of(h, 1e-5, "prv") == pytest.approx(7.51, abs=0.01)
    assert eps_of(h, 1e-5, "pld") == pytest.approx(7.50, abs=0.01)
    # independently: dp-accounting's own RDP and PLD on the same event
    assert eps_of(h, 1e-5, "rdp") == pytest.approx(_google("rdp", 0.5793, 1 / 13, 9, 1e-5), 0.01)
    assert eps_of(h, 1e-5, "prv") == pytest.approx(eps_of(h, 1e-5, "pld"), rel=0.01)


@pytest.mark.parametrize(("sigma", "steps"), [(1.0, 10), (5.376, 80), (2.0, 1)])
def test_prv_and_pld_match_the_exact_gaussian_profile_at_q_1(sigma, steps):
    exact = exact_gaussian_epsilon(sigma, steps, 1e-5)
    for accountant in ("prv", "pld"):
        got = eps_of([(sigma, 1.0, steps)], 1e-5, accountant)
        assert got == pytest.approx(exact, rel=0.01, abs=0.01), accountant
        assert got >= exact - 0.01  # upper bounds, up to their discretisation
    assert eps_of([(sigma, 1.0, steps)], 1e-5, "rdp") > exact  # RDP is looser


Q, STEPS = 64 / 830, 9  # the SmolLM2 DP baseline's largest sample rate and its steps


@pytest.mark.parametrize(
    "accountant",
    [
        "rdp",
        pytest.param("prv", marks=pytest.mark.slow),
        pytest.param("pld", marks=pytest.mark.slow),
    ],
)  # PRV/PLD at sigma ~0.56, q ~0.08 take several seconds per evaluation on a loaded 2-core CPU
def test_calibration_spends_the_budget_with_each_accountant(accountant):
    sigma = calibrate_noise(8.0, 1e-5, Q, STEPS, accountant)
    spent = eps_of([(sigma, Q, STEPS)], 1e-5, accountant)
    assert 8.0 * 0.98 <= spent <= 8.0
    if accountant != "rdp":  # PRV's and PLD's sigma checked by the other tight accountant
        assert _google("pld", sigma, Q, STEPS, 1e-5) <= 8.0 + 0.02
        assert sigma < calibrate_noise(8.0, 1e-5, Q, STEPS, "rdp")  # less noise, same budget


def test_record_level_epsilon_in_flowers_types_matches_flowers_rdp_accountant():
    from flwr.serverapp import RdpAccountant

    n, batch, sigma, steps = 830, 64, 0.61, 9
    state = AccountantState("rdp", 8.0, 1e-5, sigma, [(sigma, batch / n, steps)])
    spent = state.privacy_spent()
    assert isinstance(spent, PrivacySpent)
    assert (spent.num_releases, spent.delta, spent.accounting_method) == (steps, 1e-5, "rdp")
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=n,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.POISSON,
        )
    )
    flower.compose(GaussianPrivacyEvent(sigma, batch, n), count=steps)
    assert spent.epsilon == pytest.approx(flower.get_privacy_spent().epsilon, rel=0.01)


def test_pld_engine_reports_pld_and_roundtrips():
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dp = DPConfig(target_epsilon=4.0, accountant="pld", noise_multiplier=1.5)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    engine = DPLoRAEngine.from_context(context, dp)
    model = torch.nn.Linear(2, 1)
    loader = DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dp_model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, steps_per_round=3, expected_rounds=2,
        adapter_only=False,
    )  # fmt: skip
    for (xb,) in engine.batches(loader, opt):
        opt.zero_grad()
        dp_model(xb).sum().backward()
        opt.step()
    dp_model._close()
    engine.save(context)
    restored = AccountantState.load(context, 4.0, 1e-5, accountant="pld")
    assert restored.history == [(1.5, 0.2, 3)]
    assert engine.metrics()["dp-epsilon"] == pytest.approx(
        _google("pld", engine.noise_multiplier, 0.2, 3, 1e-5), rel=1e-9
    )
    assert str(engine.info_record()["accountant"]) == "pld"
