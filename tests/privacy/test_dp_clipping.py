"""Per-sample clipping is really applied, to the adapter only (Opacus hooks mode + PEFT)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flwr_ext.privacy import DPConfig, DPLoRAEngine, causal_lm_loss, check_adapter_only

from .helpers import make_lora_model, token_loader

N, BATCH, LR, CLIP = 16, 8, 50.0, 0.05


@pytest.mark.parametrize("physical", [None, 3])
def test_noise_free_dp_step_equals_hand_clipped_per_sample_gradients(physical):
    model = make_lora_model(nonzero_b=True)
    reference = copy.deepcopy(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    dp = DPConfig(
        target_epsilon=math.inf,
        max_grad_norm=CLIP,
        noise_multiplier=0.0,
        max_physical_batch_size=physical,
        insecure_reproducible=True,  # a fixed Poisson batch, so the step size check is stable
    )
    engine = DPLoRAEngine(dp)
    dp_model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=token_loader(N, BATCH),
        steps_per_round=1,
        seed=(3, 1, 0),
    )
    # take one logical step (possibly several physical batches), recording the samples used
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    for (x,) in engine.batches(loader, opt):
        seen.append(x)
        opt.zero_grad()  # keeps the summed clipped grads of skipped physical steps
        causal_lm_loss(dp_model(input_ids=x).logits, x).backward()
        opt.step()
    batch = torch.cat(seen)
    assert batch.shape[0] > 0

    # by hand: per-sample gradients of the adapter, clipped to CLIP, summed, / expected batch
    ref_params = dict(reference.named_parameters())
    total = {n: torch.zeros_like(ref_params[n]) for n in trainable}
    norms = []
    for i in range(batch.shape[0]):
        reference.zero_grad()
        xi = batch[i : i + 1]
        causal_lm_loss(reference(input_ids=xi).logits, xi).backward()
        grads = {n: ref_params[n].grad.detach().clone() for n in trainable}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        norms.append(float(norm))
        factor = min(1.0, CLIP / (float(norm) + 1e-6))
        for n in trainable:
            total[n] += grads[n] * factor
    assert max(norms) > CLIP, "the test must exercise clipping"
    expected_batch = int(N * (1 / len(token_loader(N, BATCH))))
    for name, p in model.named_parameters():
        if name in total:
            step = -LR * total[name] / expected_batch
            err = (p.detach() - start[name] - step).abs().max()
            assert err <= 1e-4 * step.abs().max() + 1e-6, (name, float(err))
            assert step.abs().max() > 1e-3, name  # lora_A too: lora_B was set non-zero
        else:
            assert torch.equal(p.detach(), start[name]), name


def test_dp_step_moves_adapter_and_only_adapter():
    model = make_lora_model(nonzero_b=False)  # PEFT's own init: lora_B == 0
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = DPLoRAEngine(DPConfig(target_epsilon=8.0, noise_multiplier=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dp_model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=token_loader(32, 8), steps_per_round=2
    )
    for (x,) in engine.batches(loader, opt):
        opt.zero_grad()
        causal_lm_loss(dp_model(input_ids=x).logits, x).backward()
        opt.step()
    assert engine.steps_taken == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    adapter = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == adapter
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_trainable_base_weights_are_refused():
    model = make_lora_model()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="base parameters are trainable"):
        check_adapter_only(model)
