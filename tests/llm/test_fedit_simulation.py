"""A real Flower simulation of the packaged fedit-llm app with the tiny Llama, plus resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fedit_llm.config import build_model, validate
from fedit_llm.server_app import build_strategy

from flwr_ext.llm.checkpoint import (
    load_checkpoint,
    restore_strategy_state,
    save_checkpoint,
    strategy_state,
)
from flwr_ext.llm.lora import adapter_state, count_params
from flwr_ext.wrappers import innermost

from .fedit_helpers import config, run


def test_fedit_simulation_loss_falls_and_only_adapter_travels(tmp_path):
    out = tmp_path / "run"
    cfg = config(out, **{"checkpoint-every": 1, "eval-generate": True, "eval-max-new-tokens": 4})
    res = run(cfg)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    losses = [r["eval-loss"] for r in rounds]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    # only adapter tensors travel, in both directions, counted on the wire by Compressed
    model, _ = build_model(validate(cfg))
    expected = adapter_state(model)
    assert set(res["adapter-keys"]) == set(expected)
    assert all(".lora_A." in k or ".lora_B." in k for k in res["adapter-keys"])
    n_bytes = 4 * count_params(expected)
    for r in rounds[1:]:
        assert n_bytes <= r["train/uplink-bytes-per-update"] < n_bytes + 200 * len(expected)
        assert r["train/bytes-up-uncompressed"] == r["train/uplink-bytes-per-update"]
        assert r["train/downlink-bytes"] == 2 * r["train/bytes-down"]
        assert r["train/uplink-bytes-per-update"] < 0.1 * res["base-model-bytes"]
    # cosine learning-rate schedule across rounds, seen by the clients
    assert [r["train/lr"] for r in rounds[1:]] == pytest.approx([0.01, 0.003])
    # weights changed; checkpoints every round
    _, adapter, _, meta = load_checkpoint(out)
    assert meta["server_round"] == 2
    assert all(np.abs(v).sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"reference", "generation", "category"} <= set(samples[0])
    assert "em" in rounds[-1] and any(k.startswith("em-") for k in rounds[-1])


@pytest.mark.slow
def test_fedit_simulation_resume(tmp_path):
    out = tmp_path / "run"
    res = run(config(out))
    losses = [r["eval-loss"] for r in res["rounds"]]
    # resume: one more round from the round-2 checkpoint continues the count and the loss
    out2 = tmp_path / "resumed"
    res2 = run(config(out2, **{"num-server-rounds": 3, "resume": str(out)}))
    assert [r["round"] for r in res2["rounds"]] == [2, 3]
    assert res2["rounds"][0]["eval-loss"] == pytest.approx(losses[-1], rel=1e-5)
    assert res2["rounds"][1]["eval-loss"] < losses[-1]


def test_ffa_round_trip_sends_b_only_and_fedadam_state_resumes(tmp_path):
    cfg = validate(config(tmp_path, aggregation="ffa", strategy="fedadam"))
    model, _ = build_model(cfg)
    sent = adapter_state(model, trainable_only=True)
    assert sent and all(".lora_B." in k for k in sent)
    strategy = build_strategy(cfg)
    inner = innermost(strategy)
    assert type(inner).__name__ == "FedAdam"
    inner.m_t = {k: np.ones_like(v) for k, v in sent.items()}
    inner.v_t = {k: np.full_like(v, 2.0) for k, v in sent.items()}
    inner.current_arrays = dict(sent)
    save_checkpoint(model, tmp_path, 5, inner)
    rnd, adapter, st, _ = load_checkpoint(tmp_path)
    assert rnd == 5 and set(adapter) == set(adapter_state(model))
    fresh = build_strategy(cfg)
    restore_strategy_state(innermost(fresh), st)
    for attr in ("m_t", "v_t", "current_arrays"):
        got, ref = strategy_state(innermost(fresh))[attr], strategy_state(inner)[attr]
        assert set(got) == set(ref) and all(np.array_equal(got[k], ref[k]) for k in ref)
