"""Defect 2 of issue 14: Poisson batches and DP noise must not be recomputable from the run config.

The server knows the run config, the round and the partition id. If the loader's generator is
seeded from them (as ``dp_train`` and the fedit ClientApp did), it can recompute which examples
each DP-SGD step used, and the amplification by subsampling that the accountant assumes is gone.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, RecordDict
from torch.utils.data import DataLoader, TensorDataset

from flwr_ext.privacy import DPConfig, DPLoRAEngine

N = 64


def _draw(dp: DPConfig, seed: int = 7) -> tuple[list[list[int]], torch.Tensor]:
    """Batch membership of 6 DP-SGD steps and the noised update of a zero-gradient model.

    The caller seeds everything from the public config, exactly as the app did before the fix:
    the loader's generator and the global torch RNG.
    """
    torch.manual_seed(seed)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = TensorDataset(torch.arange(N, dtype=torch.float32).unsqueeze(1))
    loader = DataLoader(data, batch_size=8, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    engine = DPLoRAEngine.from_context(context, dp)
    dp_model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        steps_per_round=6,
        adapter_only=False,
        seed=(seed, 1, 0),
    )
    batches = []
    for (xb,) in engine.batches(loader, opt):
        batches.append(sorted(int(v) for v in xb.squeeze(1)))
        opt.zero_grad()
        (0.0 * dp_model(xb).sum()).backward()  # zero gradient: the update is the noise alone
        opt.step()
    dp_model._close()
    return batches, model.weight.detach().clone()


def test_default_sampling_and_noise_come_from_a_secret_source():
    dp = DPConfig(target_epsilon=8.0, noise_multiplier=1.0)
    b1, w1 = _draw(dp)
    b2, w2 = _draw(dp)
    assert b1 != b2  # same public config, different batches (P(equal) = 2^-384)
    assert not torch.equal(w1, w2)  # and different noise
    assert any(b1)  # batches were drawn at all


def test_reproducible_only_with_the_insecure_flag_and_it_is_marked(caplog):
    dp = DPConfig(target_epsilon=8.0, noise_multiplier=1.0, insecure_reproducible=True)
    with caplog.at_level(logging.WARNING):
        b1, w1 = _draw(dp)
    b2, w2 = _draw(dp)
    assert b1 == b2 and torch.equal(w1, w2)
    assert _draw(dp, seed=8)[0] != b1  # the seed still matters
    assert any("INSECURE" in r.getMessage() for r in caplog.records)

    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    engine = DPLoRAEngine.from_context(context, dp)
    assert engine.metrics()["dp-privacy-claim"] == 0.0
    assert "not a privacy claim" in str(engine.info_record()["guarantee"])
    secure = DPLoRAEngine(DPConfig(target_epsilon=8.0))
    assert secure.metrics()["dp-privacy-claim"] == 1.0


def test_insecure_flag_from_run_config_and_its_name():
    assert DPConfig.from_run_config({"dp.target-epsilon": 8}).insecure_reproducible is False
    cfg = DPConfig.from_run_config({"dp.target-epsilon": 8, "dp.insecure-reproducible": True})
    assert cfg.insecure_reproducible is True
