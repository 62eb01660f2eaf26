"""DP-LoRA inside the fedit-llm ClientApp: the privacy API wired as docs/privacy.md says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fedit_llm.config import build_model, validate
from flwr.app import Context, RecordDict

from flwr_ext.llm import dp_train
from flwr_ext.llm.lora import adapter_state
from flwr_ext.llm.tasks import client_records, tokenize
from flwr_ext.privacy import (
    STATE_KEY,
    AccountantState,
    DPConfig,
    PrivacyBudgetExhausted,
    compute_epsilon,
)

from .fedit_helpers import config, run

DP = {"dp.target-epsilon": 8.0, "dp.delta": 1e-5, "dp.max-grad-norm": 1.0}


def _setup(tmp_path, **overrides):
    cfg = validate(config(tmp_path, **{**DP, **overrides}))
    model, tok = build_model(cfg)
    examples = tokenize(cfg, client_records(cfg, 0, 2), tok)
    return cfg, model, tok, examples


def _round(model, tok, examples, context, dp, steps=3, expected_rounds=2):
    return dp_train.train_lora_dp(
        model, examples, tok.pad_token_id, context=context, dp=dp, steps=steps,
        expected_rounds=expected_rounds, batch_size=8, lr=0.01, seed=0,
    )  # fmt: skip


def test_dp_round_epsilon_is_opacus_accounting_and_grows(tmp_path):
    cfg, model, tok, examples = _setup(tmp_path)
    dp = DPConfig.from_run_config(cfg)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_state(model)
    m1 = _round(model, tok, examples, context, dp)
    m2 = _round(model, tok, examples, context, dp)
    # the accountant survives in context.state; epsilon is recomputed independently from it
    state = AccountantState.load(context, dp.target_epsilon, dp.delta, accountant="rdp")
    q = 1.0 / -(-len(examples) // 8)
    # Opacus merges consecutive steps of the same (sigma, q) into one history entry
    assert state.history == [(pytest.approx(m1["dp-noise-multiplier"]), pytest.approx(q), 6)]
    assert m1["dp-epsilon"] == pytest.approx(
        compute_epsilon([(m1["dp-noise-multiplier"], q, 3)], 1e-5, "rdp")
    )
    assert m2["dp-epsilon"] == pytest.approx(compute_epsilon(state.history, 1e-5, "rdp"))
    assert m1["dp-epsilon"] < m2["dp-epsilon"] <= 8.0
    assert m1["steps"] == m2["steps"] == 3 and m2["dp-steps"] == 6
    assert str(m2["info"]["accountant"]) == "rdp" and str(m2["info"]["level"]) == "record"
    assert STATE_KEY in context.state
    # adapter changed, frozen base did not; Opacus hooks are gone (the model is reused)
    after = adapter_state(model)
    assert any(not np.array_equal(before[k], after[k]) for k in after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        assert not hasattr(p, "grad_sample")
    assert not any(m._forward_hooks for m in model.modules())


def test_dp_round_refuses_when_budget_spent(tmp_path):
    cfg, model, tok, examples = _setup(tmp_path, **{"dp.target-epsilon": 2.0})
    dp = DPConfig.from_run_config(cfg)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    _round(model, tok, examples, context, dp, expected_rounds=1)  # plans for one round only
    spent = dict(context.state[STATE_KEY])
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget exhausted"):
        _round(model, tok, examples, context, dp, expected_rounds=1)
    assert dict(context.state[STATE_KEY]) == spent  # nothing consumed by the refused round


def test_loss_goes_through_criterion_not_hf_labels(tmp_path, monkeypatch):
    """The trap: a loss computed inside the HF model (``labels=``) bypasses per-example maths."""
    cfg, model, tok, examples = _setup(tmp_path)
    calls = []
    real = dp_train.causal_lm_loss

    def spy(logits, labels):
        calls.append(tuple(labels.shape))
        return real(logits, labels)

    kwargs_seen = []
    hook = model.register_forward_pre_hook(
        lambda mod, args, kwargs: kwargs_seen.append(set(kwargs)), with_kwargs=True
    )
    monkeypatch.setattr(dp_train, "causal_lm_loss", spy)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    _round(model, tok, examples, context, DPConfig.from_run_config(cfg), steps=2)
    hook.remove()
    assert len(calls) >= 1
    assert kwargs_seen and all("labels" not in k for k in kwargs_seen)


def test_dp_sparse_lora_simulation_reports_growing_epsilon(tmp_path):
    """Real simulation: DP-SGD on the client, then sparse-lora on its noised update."""
    cfg = config(tmp_path / "dp", compression="sparse-lora", **DP)
    res = run(cfg)
    rounds = res["rounds"][1:]
    eps = [r["train/dp-epsilon-max"] for r in rounds]
    assert 0 < eps[0] < eps[1] <= 8.0, eps
    sigma = rounds[0]["train/dp-noise-multiplier"]
    assert sigma > 0 and rounds[1]["train/dp-steps"] == 2 * cfg["local-steps"]
    for r in rounds:
        assert r["train/uplink-bytes-per-update"] < 0.5 * r["train/bytes-up-uncompressed"]
        assert r["train/dropped-replies"] == 0
    assert all(r["eval-loss"] == r["eval-loss"] for r in res["rounds"])  # finite, not NaN


def _app_round(tmp_path, **overrides):
    """One round of the app's own local training (flwr_ext.llm.local) from a fixed start."""
    from flwr_ext.llm.local import local_train

    cfg, model, tok, examples = _setup(tmp_path, **{"dp.noise-multiplier": 1.0, **overrides})
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config=cfg)
    out = local_train(cfg, model, tok.pad_token_id, examples, context, rnd=1, pid=0, steps=2)
    return adapter_state(model), out


@pytest.mark.slow  # four tiny-model rounds; the engine-level test is in tests/privacy
def test_app_dp_batches_and_noise_are_secret_unless_insecure_flag(tmp_path):
    """Issue 14, defect 2, through the app's code path: same run config, same round, same
    partition -> different DP-SGD results by default; identical only with the INSECURE flag,
    which then reports that its epsilon is not a privacy claim."""
    a, out_a = _app_round(tmp_path)
    b, _ = _app_round(tmp_path)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    assert out_a["dp-privacy-claim"] == 1.0
    insecure = {"dp.insecure-reproducible": True}
    c, out_c = _app_round(tmp_path, **insecure)
    d, _ = _app_round(tmp_path, **insecure)
    assert all(np.array_equal(c[k], d[k]) for k in c)
    assert out_c["dp-privacy-claim"] == 0.0
    assert "not a privacy claim" in str(out_c["info"]["guarantee"])
