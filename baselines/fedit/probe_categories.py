"""How fast one client's LoRA learns each synthetic category on SmolLM2 (CPU; minutes).

Used to pick the FedIT baseline's categories and step budget (README, "Why these settings"):
prints tokens per example for every prompt template, then trains one LoRA adapter (r=8 on q,v)
on all categories with ``train_lora`` and prints held-out loss and exact match per category after
each block of steps.

    HF_HUB_OFFLINE=1 .venv/bin/python baselines/fedit/probe_categories.py --template chat-short \\
        --blocks 20 20 40 --batch-size 8 --lr 2e-3
"""

from __future__ import annotations

import argparse
import time

import torch

from flwr_ext.llm.data import tokenize_records
from flwr_ext.llm.evaluate import evaluate_model, generate_answers
from flwr_ext.llm.lora import apply_lora
from flwr_ext.llm.models import load_model_and_tokenizer
from flwr_ext.llm.synthetic import generate_tasks
from flwr_ext.llm.templates import TEMPLATES
from flwr_ext.llm.train import train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--template", default="chat-short")
    ap.add_argument("--blocks", type=int, nargs="+", default=[20, 20, 40])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", type=int, default=700)
    ap.add_argument("--eval", type=int, default=70)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base, tok = load_model_and_tokenizer("smollm2")
    train = generate_tasks(args.train, seed=0)
    held = generate_tasks(args.eval, seed=1, exclude=train)
    for t in TEMPLATES:
        n = [len(e["input_ids"]) for e in tokenize_records(train, tok, args.max_length, t)]
        print(f"{t}: mean tokens {sum(n) / len(n):.1f} max {max(n)}", flush=True)
    t = args.template
    model = apply_lora(base, r=8, alpha=16, targets="q_proj,v_proj", seed=0)
    ex_held = tokenize_records(held, tok, args.max_length, t)
    ex_train = tokenize_records(train, tok, args.max_length, t)
    zero_shot = generate_answers(model, tok, held[:14], t, 12, 14)
    for rec, pred in zip(held[:14], zero_shot, strict=True):
        print(f"zero-shot {rec['output']!r} -> {pred!r}")

    def report(step: int) -> None:
        t0 = time.perf_counter()
        m = evaluate_model(model, tok, held, ex_held, t, args.new_tokens, 35)
        rounded = {k: round(v, 3) for k, v in m.items()}
        print(f"step {step} eval {time.perf_counter() - t0:.1f} s {rounded}", flush=True)

    report(0)
    done = 0
    for steps in args.blocks:
        out = train_lora(
            model, ex_train, tok.pad_token_id, steps, args.batch_size, args.lr, seed=done,
            progress=False,
        )  # fmt: skip
        done += steps
        stats = {k: round(v, 3) for k, v in out.items()}
        print(f"train {done} {stats}", flush=True)
        report(done)


if __name__ == "__main__":
    main()
