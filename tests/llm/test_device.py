"""Device placement on the CPU: DeviceConfig, the quantization builder, dtype choice, device order.

The step functions here (:func:`dp_step`, :func:`sfprompt_step`) take the device as an argument;
the CPU tests run them here and ``test_gpu.py`` runs the same functions on CUDA, so the harness
itself is checked on every machine.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from flwr_ext.llm.data import tokenize_records
from flwr_ext.llm.lora import adapter_state, apply_lora
from flwr_ext.llm.models import (
    DeviceConfig,
    load_model_and_tokenizer,
    quantization_config,
    resolve_device,
    select_dtype,
)
from flwr_ext.llm.synthetic import generate_tasks
from flwr_ext.llm.train import train_lora

NO_CUDA = not torch.cuda.is_available()
cpu_only = pytest.mark.skipif(not NO_CUDA, reason="checks the no-CUDA behaviour")


# -- DeviceConfig, resolver, dtype, quantization builder -------------------------------------------
@cpu_only
def test_auto_resolves_to_cpu_fp32_without_cuda():
    cfg = DeviceConfig()
    assert cfg.torch_device() == torch.device("cpu")
    assert cfg.torch_dtype() == torch.float32
    assert resolve_device("auto") == torch.device("cpu")
    assert cfg.bnb_config() is None and not cfg.quantized


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:x"}, "device"),
        ({"dtype": "fp8"}, "dtype"),
        ({"quantization": "3bit"}, "quantization"),
        ({"quantization": "4bit", "device": "cpu"}, "quantization"),
    ],
)
def test_device_config_rejects_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        DeviceConfig(**kwargs)


def test_device_config_from_run_config():
    cfg = DeviceConfig.from_run_config(
        {"device": "CUDA:1", "dtype": "BF16", "quantization": "4BIT", "gradient-checkpointing": "1"}
    )
    assert cfg == DeviceConfig("cuda:1", "bf16", "4bit", True)
    assert DeviceConfig.from_run_config({}) == DeviceConfig()
    with pytest.raises(ValueError, match="gradient-checkpointing"):
        DeviceConfig.from_run_config({"gradient-checkpointing": "maybe"})


@cpu_only
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantization_builder_refuses_kbit_without_cuda_naming_the_key(bits):
    with pytest.raises(RuntimeError, match=f"quantization='{bits}'.*CUDA"):
        quantization_config(bits)
    with pytest.raises(RuntimeError, match="quantization"):
        DeviceConfig(quantization=bits).bnb_config()
    with pytest.raises(RuntimeError, match="quantization"):
        load_model_and_tokenizer("tiny", placement=DeviceConfig(quantization=bits))
    assert quantization_config("none") is None and quantization_config(None) is None


@cpu_only
def test_cuda_device_without_cuda_is_refused_naming_the_key():
    with pytest.raises(RuntimeError, match="device='cuda'"):
        resolve_device("cuda")
    with pytest.raises(RuntimeError, match="device"):
        DeviceConfig(device="cuda").torch_device()


def test_dtype_selection(monkeypatch):
    assert select_dtype("fp32", "cuda") == torch.float32
    assert select_dtype("bf16", "cpu") == torch.bfloat16
    assert select_dtype("fp16", "cpu") == torch.float16
    assert select_dtype("auto", "cpu") == torch.float32  # CPU training stays fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_dtype("auto", "cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert select_dtype("auto", "cuda:0") == torch.float32  # no bf16: fp32, not fp16 w/o scaler
    with pytest.raises(ValueError, match="dtype"):
        select_dtype("int4", "cpu")


def test_fedit_app_validates_the_device_keys(tmp_path):
    from fedit_llm.config import validate

    from .fedit_helpers import config

    base = config(tmp_path)
    assert validate({**base, "quantization": "4bit"})["quantization"] == "4bit"  # CUDA: at load
    for bad, key in [
        ({"device": "tpu"}, "device"),
        ({"dtype": "fp64"}, "dtype"),
        ({"quantization": "2bit"}, "quantization"),
        ({"quantization": "8bit", "device": "cpu"}, "quantization"),
        ({"gradient-checkpointing": "sometimes"}, "gradient-checkpointing"),
    ]:
        with pytest.raises(ValueError, match=key):
            validate({**base, **bad})
    with pytest.raises(ValueError, match="flora"):
        validate({**base, "quantization": "4bit", "aggregation": "flora"})


# -- the device order: load onto the device, then LoRA, then the optimizer ---------------------
def lora_train_on(device: str, dtype: str = "fp32", steps: int = 3, **placement: Any) -> dict:
    """The app's path: placed base -> apply_lora -> train_lora; what changed and where it lives."""
    cfg = DeviceConfig(device=device, dtype=dtype, **placement)
    base, tok = load_model_and_tokenizer("tiny", seed=0, placement=cfg)
    model = apply_lora(base, r=4, alpha=8, targets="q_proj,v_proj", seed=0)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    init = adapter_state(model)
    examples = tokenize_records(generate_tasks(24, seed=0), tok, 64, "alpaca")
    out = train_lora(
        model, examples, tok.pad_token_id, steps, batch_size=4, lr=1e-2, progress=False
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    devices = {p.device.type for p in model.parameters()}
    return {
        "out": out,
        "changed": changed,
        "trainable": trainable,
        "devices": devices,
        "init": init,
        "base_dtype": next(p for n, p in model.named_parameters() if "q_proj.base" in n).dtype,
        "adapter_dtype": next(p for n, p in model.named_parameters() if "lora_A" in n).dtype,
    }


def test_device_order_trains_lora_on_cpu():
    res = lora_train_on("cpu")
    assert res["devices"] == {"cpu"}
    assert res["changed"] == res["trainable"]  # adapter (A and B) trains, the base does not
    assert any("lora_A" in n for n in res["changed"]) and any("lora_B" in n for n in res["changed"])
    assert res["out"]["steps"] == 3 and math.isfinite(res["out"]["loss"])
    # the adapter initialisation does not depend on the device or on placement
    base, _ = load_model_and_tokenizer("tiny", seed=0)
    ref = adapter_state(apply_lora(base, r=4, alpha=8, targets="q_proj,v_proj", seed=0))
    assert all(np.array_equal(ref[k], v) for k, v in res["init"].items())


def test_bf16_base_with_fp32_adapter_and_gradient_checkpointing_train_on_cpu():
    res = lora_train_on("cpu", dtype="bf16", steps=2, gradient_checkpointing=True)
    assert res["base_dtype"] == torch.bfloat16 and res["adapter_dtype"] == torch.float32
    assert res["changed"] == res["trainable"]
    assert math.isfinite(res["out"]["loss"])


# -- DP-LoRA: noise 0 + plain SGD equals per-sample gradients clipped by hand ------------------
DP_N, DP_BATCH, DP_LR, DP_CLIP, DP_SEQ = 16, 8, 50.0, 0.05, 12


def dp_step(device: str, quantization: str = "none") -> dict[str, Any]:
    """One noise-free DP-SGD step (SGD) on the adapter of a tiny Llama placed on ``device``.

    Returns the largest relative error against per-sample gradients clipped by hand, whether
    clipping was exercised, and which parameters changed versus which train.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from flwr_ext.privacy import DPConfig, DPLoRAEngine, causal_lm_loss

    placement = DeviceConfig(device=device, dtype="fp32", quantization=quantization)
    base, tok = load_model_and_tokenizer("tiny", seed=0, placement=placement)
    model = apply_lora(base, r=4, alpha=8, targets="q_proj,v_proj", seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero: make lora_A's gradient non-zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen).to(p.device))
    reference = copy.deepcopy(model)
    dev = next(model.parameters()).device
    x_all = torch.randint(0, len(tok), (DP_N, DP_SEQ), generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x_all), batch_size=DP_BATCH)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=DP_LR)
    dp = DPConfig(target_epsilon=math.inf, max_grad_norm=DP_CLIP, noise_multiplier=0.0)
    engine = DPLoRAEngine(dp)
    dp_model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, steps_per_round=1
    )
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []
    for (x,) in engine.batches(loader, opt):
        x = x.to(dev)
        seen.append(x)
        opt.zero_grad()
        causal_lm_loss(dp_model(input_ids=x).logits, x).backward()
        opt.step()
    dp_model._close()  # noqa: SLF001 - drop the Opacus hooks
    batch = torch.cat(seen)
    ref_params = dict(reference.named_parameters())
    total = {n: torch.zeros_like(ref_params[n]) for n in trainable}
    norms = []
    for i in range(batch.shape[0]):
        reference.zero_grad()
        xi = batch[i : i + 1]
        causal_lm_loss(reference(input_ids=xi).logits, xi).backward()
        grads = {n: ref_params[n].grad.detach().clone() for n in trainable}
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))
        norms.append(norm)
        for n in trainable:
            total[n] += grads[n] * min(1.0, DP_CLIP / (norm + 1e-6))
    expected_batch = DP_N // len(DataLoader(TensorDataset(x_all), batch_size=DP_BATCH))
    rel_err = 0.0
    for name in trainable:
        p = dict(model.named_parameters())[name]
        step = -DP_LR * total[name] / expected_batch
        err = float((p.detach() - start[name] - step).abs().max())
        rel_err = max(rel_err, err / (float(step.abs().max()) + 1e-12))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])}
    return {
        "rel_err": rel_err,
        "clipped": max(norms) > DP_CLIP,
        "batch": int(batch.shape[0]),
        "changed": changed,
        "trainable": set(trainable),
        "device": dev.type,
    }


def test_dp_step_harness_on_cpu():
    res = dp_step("cpu")
    assert res["device"] == "cpu" and res["batch"] > 0 and res["clipped"]
    assert res["rel_err"] < 1e-4, res["rel_err"]
    assert res["changed"] == res["trainable"]


# -- SFPrompt: one split step through the client's handlers ----------------------------------
@pytest.fixture
def server_identity():
    """Message() needs the run identity a real ServerApp process has; restore it afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


def sfprompt_step(device: str, tail_mode: str = "lora") -> dict[str, np.ndarray]:
    """start (one local-loss step) -> forward -> body -> tail -> backward for one client.

    The tiny fp32 Llama is placed on ``device`` before the split (soft prompt and tail LoRA are
    created there). Returns the cut activations, the gradient sent back, and the trained state.
    """
    from flwr.app import ConfigRecord

    from flwr_ext.llm.sfprompt import (
        ACTS,
        BACKWARD,
        BODY,
        CONFIG,
        FORWARD,
        GRAD,
        PARAMS,
        START,
        TAIL,
        SFPromptClient,
        to_record,
    )
    from flwr_ext.llm.split import split_causal_lm

    placement = DeviceConfig(device=device, dtype="fp32")
    model, tok = load_model_and_tokenizer("tiny", seed=0, placement=placement)
    split = split_causal_lm(model, 1, 1, num_virtual_tokens=4, tail_mode=tail_mode, seed=0)
    dev = next(split.parameters()).device
    examples = tokenize_records(generate_tasks(16, seed=0), tok, 64, "alpaca")
    client = SFPromptClient(split, examples, tok.pad_token_id, batch_size=4, seed=0)
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def send(mtype: str, **records: Any) -> Message:
        msg = Message(RecordDict(records), dst_node_id=1, message_type=mtype)
        return getattr(client, mtype.removeprefix("train."))(msg, ctx)

    rnd = {"server-round": 1, "step": 0}
    start_cfg = ConfigRecord({"server-round": 1, "lr": 0.05, "tail-lr": 0.01, "local-steps": 1})
    send(START, **{PARAMS: to_record(split.trainable_state()), CONFIG: start_cfg})
    acts = send(FORWARD, **{CONFIG: ConfigRecord(rnd)}).content[ACTS]
    cut = torch.tensor(acts["hidden"].numpy(), device=dev, requires_grad=True)
    out = split.body(cut, torch.as_tensor(acts["mask"].numpy()).long().to(dev))  # the server
    body = to_record({"hidden": out.detach().cpu().numpy()})
    grad = send(TAIL, **{BODY: body, CONFIG: ConfigRecord(rnd)}).content[GRAD]
    out.backward(torch.as_tensor(grad["grad"].numpy()).to(dev))
    send(BACKWARD, **{GRAD: to_record({"grad": cut.grad.cpu().numpy()}), CONFIG: ConfigRecord(rnd)})
    return {
        "device": dev.type,
        "acts": acts["hidden"].numpy(),
        "grad": grad["grad"].numpy(),
        **{f"state/{k}": v for k, v in split.trainable_state().items()},
    }


def test_sfprompt_step_harness_on_cpu_is_deterministic(server_identity):
    a, b = sfprompt_step("cpu"), sfprompt_step("cpu")
    assert a["device"] == "cpu"
    assert set(a) == set(b) and any(k.startswith("state/tail.") for k in a)
    for k in a:
        if k != "device":
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert np.abs(a["grad"]).max() > 0
