"""In-process SFPrompt learning-rate probe on SmolLM2 (not a Flower run; used to pick the rates).

Trains prompt and tail through head -> body -> tail in one graph (the same gradients as the split
protocol: ``tests/llm/test_split.py``) with the client's Adam, then evaluates on the held-out
split with the apps' evaluation. Template alpaca-short, all 7 synthetic categories, batch 4.

    nice -n 10 .venv/bin/python baselines/sfprompt/probe_lr.py 0.03 20,40      # lr, eval after
    nice -n 10 .venv/bin/python baselines/sfprompt/probe_lr.py 0.1 40
    nice -n 10 .venv/bin/python baselines/sfprompt/probe_lr.py 0.03 40 \
        '{"tail-layers":2,"tail-lora-r":16,"tail-lora-alpha":32.0,
          "tail-lora-targets":"q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"}'

``EVAL0=1`` also evaluates before training.
"""

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "apps" / "sfprompt-llm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sfprompt_llm.config import build_split, validate  # noqa: E402

from flwr_ext.llm.data import ResponseOnlyCollator  # noqa: E402
from flwr_ext.llm.sfprompt import Adam  # noqa: E402
from flwr_ext.llm.split import PromptedLM  # noqa: E402
from flwr_ext.llm.tasks import evaluate, tokenize, train_eval_records  # noqa: E402
from flwr_ext.sim import fused_run_config  # noqa: E402

OUT = "outputs/sfprompt-probe"


def main() -> None:
    torch.set_num_threads(1)
    lr = float(sys.argv[1])
    steps = [int(x) for x in sys.argv[2].split(",")]
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    ov = {
        "model": "smollm2",
        "template": "alpaca-short",
        "max-length": 96,
        "eval-max-new-tokens": 12,
        "eval-batch-size": 14,
        **extra,
    }
    cfg = validate(fused_run_config(ROOT / "apps" / "sfprompt-llm", ov))
    split, tok = build_split(cfg)
    train, held, _ = train_eval_records(cfg)
    ext, exh = tokenize(cfg, train, tok), tokenize(cfg, held, tok)
    lm, col = PromptedLM(split), ResponseOnlyCollator(tok.pad_token_id)
    named = split.trainable_named_parameters()
    moments: dict = {}
    counts: dict = {}
    adam = Adam(lr)
    rng = np.random.default_rng(0)
    bs = int(cfg["batch-size"])

    def report(step: int, extra_text: str = "") -> None:
        t0 = time.perf_counter()
        m = evaluate(cfg, lm, tok, held, exh, OUT)
        ev = {k: round(v, 3) for k, v in m.items()}
        print(f"step {step} {extra_text}eval s {time.perf_counter() - t0:.1f}", ev, flush=True)

    if os.environ.get("EVAL0"):
        report(0)
    done = 0
    for s in steps:
        t0 = time.perf_counter()
        losses = []
        for _ in range(s - done):
            b = col([ext[i] for i in rng.choice(len(ext), bs, replace=False)])
            h, mask = split.head(b["input_ids"], b["attention_mask"])
            loss = split.tail.loss(split.body(h, mask), mask, b["labels"])
            loss.backward()
            adam.step(named, moments, counts)
            losses.append(float(loss.detach()))
        dt = (time.perf_counter() - t0) / len(losses)
        done = s
        report(s, f"train s/step {dt:.2f} loss {np.mean(losses[-10:]):.3f} ")


if __name__ == "__main__":
    main()
