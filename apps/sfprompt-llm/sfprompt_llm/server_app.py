"""ServerApp: hold the frozen body, drive SFPrompt rounds, evaluate, write results.

The server evaluates the averaged prompt and tail on the held-out split with fedit-llm's
evaluation (response loss, perplexity, and exact match per category on rounds that are multiples
of ``eval-generate-every`` and the last round, as fedit-llm does) and writes
``<output-dir>/results.json`` with one row per round: bytes per kind and direction, clients
finished and dropped, compute seconds on each side, and the split's sizes.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from flwr_ext.llm.sfprompt_server import SFPromptServer
from flwr_ext.llm.split import PromptedLM
from flwr_ext.llm.tasks import evaluate, lr_at, tokenize, train_eval_records
from sfprompt_llm.config import build_split, validate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` SFPrompt rounds; write ``results.json``."""
    cfg = validate(context.run_config)
    torch.set_num_threads(int(cfg["torch-threads"]))
    out_dir = Path(str(cfg["output-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    split, tok = build_split(cfg)
    _, held_out, data_stats = train_eval_records(cfg)
    eval_examples = tokenize(cfg, held_out, tok)
    lm = PromptedLM(split)

    num_rounds = int(cfg["num-server-rounds"])
    every_gen = int(cfg.get("eval-generate-every", 1) or 0)

    def evaluate_fn(server_round: int, state: dict[str, np.ndarray]) -> dict[str, Any]:
        split.load_trainable_state(state)
        gen = server_round == num_rounds or (every_gen > 0 and server_round % every_gen == 0)
        return evaluate(cfg, lm, tok, held_out, eval_examples, out_dir, generate=gen)

    def tail_lr_at(rnd: int) -> float:
        """``tail-learning-rate`` on the same schedule as ``learning-rate``."""
        scale = float(cfg["tail-learning-rate"]) / float(cfg["learning-rate"])
        return lr_at(cfg, rnd) * scale

    server = SFPromptServer(
        split,
        split_steps=int(cfg["split-steps"]),
        split_epochs=float(cfg["split-epochs"]),
        local_steps=int(cfg["local-loss-steps"]),
        lr=lambda rnd: lr_at(cfg, rnd),
        tail_lr=tail_lr_at if float(cfg.get("tail-learning-rate", 0.0)) > 0 else None,
        timeout=float(cfg["exchange-timeout"]),
        start_timeout=float(cfg["start-timeout"]),
        prune_gamma=float(cfg["prune-gamma"]),
        prune_warmup_rounds=int(cfg["prune-warmup-rounds"]),
        min_nodes=int(cfg["min-nodes"]),
        evaluate_fn=evaluate_fn,
    )
    sizes = split.sizes()
    log(
        INFO,
        "SFPrompt: client runs %d/%d layers (%.1f%%), trains %d params (%.3f%% of %d)",
        sizes.client_layers,
        sizes.num_layers,
        100 * sizes.client_layer_share,
        sizes.trained_params,
        100 * sizes.trained_share,
        sizes.total_params,
    )
    history = server.run(grid, num_rounds)
    summary = {
        "config": dict(cfg),
        "data": data_stats,
        "sizes": {
            **asdict(sizes),
            "client-layer-share": sizes.client_layer_share,
            "trained-share": sizes.trained_share,
            "client-flop-share": sizes.client_flop_share,
        },
        "trainable-keys": sorted(server.state),
        "rounds": history,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    log(INFO, "results written to %s", out_dir / "results.json")
