"""ServerApp: run the strategy on adapter states, evaluate on a held-out split, checkpoint.

Each round the server evaluates the global adapter (response loss, perplexity, and exact match per
category by greedy generation on rounds that are multiples of ``eval-generate-every`` and the last
round; 0 = last round only), logs loss and bytes, appends sample generations to
``<output-dir>/samples.jsonl``, and saves a PEFT checkpoint every ``checkpoint-every`` rounds and
at the end. ``resume`` continues from a checkpoint: round index, adapter and strategy state.

Strategy stack (outermost first): ``Compressed`` (decodes ``compression`` payloads and counts
bytes; Flower strategies only, flwr-ext's async engine decodes them itself) -> ``ClientLevelDP``
(when ``dp.client-noise-multiplier > 0``: clip each update, add Gaussian noise) -> FedAvg /
FedAdam / FLoRA. So the server decodes, then clips and noises, then aggregates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, Strategy

from fedit_llm.config import (
    FLOWER_STRATEGIES,
    build_model,
    client_level_dp,
    validate,
)
from flwr_ext.compression import Compressed
from flwr_ext.llm.aggregation import stack_rank
from flwr_ext.llm.checkpoint import load_checkpoint, restore_strategy_state, save_checkpoint
from flwr_ext.llm.lora import (
    adapter_state,
    base_weights,
    empty_stack,
    load_adapter_state,
    merge_stack,
)
from flwr_ext.llm.tasks import evaluate, tokenize, train_eval_records
from flwr_ext.privacy import ClientLevelDP, aggregate_train_metrics
from flwr_ext.strategies import FLoRA
from flwr_ext.wrappers import innermost


def build_strategy(cfg: Mapping[str, Any]) -> Any:
    """The strategy named by ``strategy`` and ``aggregation``, wrapped for DP and compression."""
    name = str(cfg["strategy"])
    if name not in FLOWER_STRATEGIES:
        # flwr-ext's async strategies read their own keys (buffer-size, staleness, clock, ...);
        # their engine decodes compressed replies against the version each node was sent.
        from flwr_ext.strategies import factory

        return factory.build_strategy(dict(cfg))
    common = {
        "fraction_train": float(cfg["fraction-train"]),
        "fraction_evaluate": 0.0,
        "min_train_nodes": int(cfg["min-train-nodes"]),
        "min_available_nodes": int(cfg["min-train-nodes"]),
        "train_metrics_aggr_fn": aggregate_train_metrics,
    }
    strategy: Strategy
    if cfg["aggregation"] == "flora":
        strategy = FLoRA(**common)
    elif name == "fedavg":
        strategy = FedAvg(**common)
    else:
        strategy = FedAdam(
            **common,
            eta=float(cfg["fedadam-eta"]),
            eta_l=float(cfg["fedadam-eta-l"]),
            tau=float(cfg["fedadam-tau"]),
        )
    if client_level_dp(cfg):
        strategy = ClientLevelDP(
            strategy,
            noise_multiplier=float(cfg["dp.client-noise-multiplier"]),
            clipping_norm=float(cfg["dp.client-clipping-norm"]),
            num_sampled_clients=int(cfg["min-train-nodes"]),
            delta=float(cfg.get("dp.client-delta", 1e-5)),
        )
    # Always outermost: decodes compressed replies, and counts uplink/downlink bytes with
    # ArrayRecord.count_bytes() for uncompressed ones too (they pass through untouched).
    return Compressed(strategy)


def _arrays(state: Mapping[str, Any]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` rounds; write ``results.json`` and checkpoints."""
    cfg = validate(context.run_config)
    torch.set_num_threads(int(cfg.get("torch-threads", 1)))
    out_dir = Path(str(cfg["output-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    num_rounds = int(cfg["num-server-rounds"])
    flora = cfg["aggregation"] == "flora"

    model, tok = build_model(cfg)
    w0 = base_weights(model)
    _, held_out, data_stats = train_eval_records(cfg)
    eval_examples = tokenize(cfg, held_out, tok)
    strategy = build_strategy(cfg)

    start = 0
    initial = empty_stack(model) if flora else adapter_state(model, cfg["aggregation"] == "ffa")
    # ``resume``: a checkpoint-<n> dir or an output dir (its latest checkpoint); validate()
    # has moved the deprecated ``resume-from`` here
    if str(cfg.get("resume", "") or ""):
        start, adapter, strat_state, _ = load_checkpoint(str(cfg["resume"]))
        restore_strategy_state(innermost(strategy), strat_state)
        if flora:
            initial = dict(strat_state["current_arrays"])
        else:
            load_adapter_state(model, adapter)
            initial = adapter_state(model, cfg["aggregation"] == "ffa")
        log(INFO, "resumed from round %d (%s)", start, cfg["resume"])
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n
    )
    history: list[dict[str, Any]] = []

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        rnd = start + server_round
        state = {k: v.numpy() for k, v in arrays.items()}
        if flora:
            merge_stack(model, w0, state)  # the server's own LoRA B stays 0
        else:
            load_adapter_state(model, state)
        every_gen = int(cfg.get("eval-generate-every", 1) or 0)
        gen = rnd == num_rounds or (every_gen > 0 and rnd % every_gen == 0)
        m = evaluate(cfg, model, tok, held_out, eval_examples, out_dir, generate=gen)
        m["adapter-bytes"] = arrays.count_bytes()
        m["round"] = rnd
        if flora:
            m["flora-rank"] = stack_rank(state)
        log(
            INFO,
            "round %d: eval-loss %.4f ppl %.2f em %s global adapter %d B (%.3f%% of base)",
            rnd,
            m["eval-loss"],
            m["eval-ppl"],
            f"{m['em']:.3f}" if "em" in m else "-",
            m["adapter-bytes"],
            100 * m["adapter-bytes"] / base_bytes,
        )
        history.append(dict(m))
        every = int(cfg["checkpoint-every"])
        if server_round > 0 and ((every > 0 and rnd % every == 0) or rnd == num_rounds):
            save_checkpoint(model, out_dir, rnd, innermost(strategy), {"config": dict(cfg)})
        return MetricRecord(m)

    start_kwargs: dict[str, Any] = {}
    if cfg["strategy"] not in FLOWER_STRATEGIES:
        from flwr_ext.strategies.factory import build_start_kwargs

        start_kwargs = build_start_kwargs(dict(cfg))
    result = strategy.start(
        grid=grid,
        initial_arrays=_arrays(initial),
        num_rounds=num_rounds - start,
        train_config=ConfigRecord({"round-offset": start}),
        evaluate_fn=evaluate_fn,
        **start_kwargs,
    )
    train_rows = {start + r: dict(rec.items()) for r, rec in result.train_metrics_clientapp.items()}
    updates = getattr(result, "updates", None)  # flwr-ext async engine: one record per reply
    if updates is not None:
        result.write_csv(out_dir / "updates.csv")
        applied: dict[int, list[int]] = {}
        for u in updates:
            if u.accepted and u.applied_in >= 0:
                applied.setdefault(start + u.applied_in, []).append(u.bytes_up)
        for rnd, sizes in applied.items():
            train_rows.setdefault(rnd, {})["uplink-bytes-per-update"] = sum(sizes) / len(sizes)
    for row in history:
        row.update({f"train/{k}": v for k, v in train_rows.get(row["round"], {}).items()})
        if "train/uplink-bytes-per-update" in row:
            log(
                INFO,
                "round %d: upload %.0f B per client (%.4f%% of the fp32 base model)",
                row["round"],
                row["train/uplink-bytes-per-update"],
                100 * row["train/uplink-bytes-per-update"] / base_bytes,
            )
    summary = {
        "config": dict(cfg),
        "data": data_stats,
        "base-model-bytes": base_bytes,
        "adapter-keys": list(result.arrays.keys()),
        "rounds": history,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2, default=str))
    log(INFO, "results written to %s", out_dir / "results.json")
