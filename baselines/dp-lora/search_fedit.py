"""Quick in-process search for the DP instruction-task settings (not the reported table).

Runs the fedit-llm app's recipe in one process (no Ray), so a configuration costs only its
training: the app's data split (``flwr_ext.llm.tasks``), ``build_model`` (LoRA, optionally on
some layers only), FedAvg of the clients' adapters each round (``fedavg_states``), the app's
local training (``flwr_ext.llm.local.local_train``: ``train_lora``, or record-level DP-SGD
with each client's accountant kept in its own ``context.state``), then the app's evaluation.
Reads one JSON object of run-config overrides per line on stdin (the keys of
``apps/fedit-llm/pyproject.toml``, e.g. ``"dp.target-epsilon": 8``), prints one JSON result per
line. The reported numbers come from ``run_fedit.py`` (Flower simulations of the app).

Usage::

    echo '{"num-train-examples": 1500, "lora-layers": "last:4", "dp.target-epsilon": 8}' \\
        | .venv/bin/python baselines/dp-lora/search_fedit.py --clients 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

import torch  # noqa: E402
from fedit_llm.config import build_model, validate  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from flwr_ext.llm.aggregation import fedavg_states  # noqa: E402
from flwr_ext.llm.local import local_train  # noqa: E402
from flwr_ext.llm.lora import adapter_state, load_adapter_state  # noqa: E402
from flwr_ext.llm.tasks import client_records, evaluate, tokenize, train_eval_records  # noqa: E402
from flwr_ext.sim import fused_run_config  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "apps" / "fedit-llm"

BASE = {
    "model": "smollm2",
    "template": "chat-short",
    "categories": "extract,convert,uppercase",
    "partitioner": "category",
    "categories-per-partition": 2,
    "num-eval-examples": 48,
    "max-length": 80,
    "lr-schedule": "constant",
    "eval-max-new-tokens": 24,
    "eval-batch-size": 16,
    "eval-num-samples": 0,
    "progress": False,
}
"""The FedIT baseline's task (``baselines/fedit``); every line of stdin is applied on top."""


def run(overrides: dict, clients: int) -> dict:
    """One configuration: FedAvg rounds of (DP-)LoRA in process, then the app's evaluation."""
    cfg = validate(fused_run_config(APP, {**BASE, **overrides}))
    model, tok = build_model(cfg)
    data = [tokenize(cfg, client_records(cfg, i, clients), tok) for i in range(clients)]
    _, held, _ = train_eval_records(cfg)
    states = [RecordDict() for _ in range(clients)]
    rounds = int(cfg["num-server-rounds"])
    global_state = adapter_state(model, True)
    last: dict = {}
    t0 = time.time()
    for rnd in range(1, rounds + 1):
        replies, weights = [], []
        for pid, examples in enumerate(data):
            load_adapter_state(model, global_state)
            context = Context(0, 0, {}, states[pid], {})
            steps = int(cfg["local-steps"])
            out = local_train(cfg, model, tok.pad_token_id, examples, context, rnd, pid, steps)
            states[pid] = context.state
            last = {k: v for k, v in out.items() if k.startswith("dp-")}
            print(f"  round {rnd} client {pid}: loss {out['loss']:.3f}", file=sys.stderr)
            replies.append(adapter_state(model, True))
            weights.append(len(examples))
        global_state = fedavg_states(replies, weights)
    train_s = time.time() - t0
    load_adapter_state(model, global_state)
    held_ex = tokenize(cfg, held, tok)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate(cfg, model, tok, held, held_ex, tmp)
    result = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("em", "eval-loss"))}
    result.update({k: round(float(v), 4) for k, v in last.items()})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        **result,
        "examples": [len(d) for d in data],
        "trainable": trainable,
        "train-s": round(train_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for line in sys.stdin:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        overrides = json.loads(line)
        t = time.time()
        out = {**overrides, **run(overrides, args.clients), "sec": round(time.time() - t, 1)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
