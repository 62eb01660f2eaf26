"""ClientApp: load the global adapter, train it on the local partition, send the adapter back.

Only the trainable adapter tensors travel (``lora_A`` and ``lora_B``; ``lora_B`` alone under
FFA-LoRA; under FLoRA the client receives the stacked global factors, merges them into its frozen
base and sends back its own rank-``r_k`` adapter). The frozen base never leaves the node.

Every setting comes from ``context.run_config`` (defaults in ``pyproject.toml``):

* ``dp.target-epsilon > 0`` trains with record-level DP-SGD (:func:`flwr_ext.llm.local.local_train`
  -> :mod:`flwr_ext.llm.dp_train`; Poisson batches and noise from OS entropy) and reports the
  cumulative ``dp-epsilon``; a spent budget raises ``PrivacyBudgetExhausted``, which
  Flower returns as an error reply.
* ``compression`` names a :mod:`flwr_ext.compression` preset; the mod below encodes the reply
  after training, so with DP the order is clip, noise, then compress.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod

from fedit_llm.config import build_model, client_rank, validate
from flwr_ext.compression import compression_mod
from flwr_ext.llm.data import DataStats
from flwr_ext.llm.local import local_train
from flwr_ext.llm.lora import adapter_state, base_weights, load_adapter_state, merge_stack
from flwr_ext.llm.tasks import client_records, tokenize

_CACHE: dict[tuple, Any] = {}
_MODS: dict[tuple[str, int], Mod] = {}

_MODEL_KEYS = ("model", "model-seed", "lora-alpha", "lora-targets", "aggregation", "seed")


def _model(cfg: Mapping[str, Any], rank: int) -> tuple[Any, Any, dict, dict]:
    """One PEFT model per process and model/LoRA config (the adapter is overwritten each round).

    Returns ``(model, tokenizer, initial adapter state, base weights of the wrapped modules)``.
    """
    key = tuple(cfg[k] for k in _MODEL_KEYS) + (rank, cfg["lora-dropout"], cfg.get("lora-layers"))
    if key not in _CACHE:
        _CACHE.clear()
        model, tok = build_model(cfg, rank=rank)
        _CACHE[key] = (model, tok, adapter_state(model), base_weights(model))
    return _CACHE[key]


def run_config_compression(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: compress the train reply with the preset named by ``compression``."""
    preset = str(context.run_config.get("compression", "none") or "none")
    if preset == "none":
        return call_next(msg, context)
    key = (preset, int(context.run_config.get("seed", 0)))
    if key not in _MODS:
        _MODS[key] = compression_mod(preset, seed=key[1])
    return _MODS[key](msg, context, call_next)


app = ClientApp(mods=[run_config_compression])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter for ``local-steps`` steps and reply with it."""
    cfg = validate(context.run_config)
    torch.set_num_threads(int(cfg.get("torch-threads", 1)))
    pid = int(context.node_config["partition-id"])
    n_parts = int(context.node_config["num-partitions"])
    rank = client_rank(cfg, pid)
    model, tok, initial, w0 = _model(cfg, rank)
    stats = DataStats()
    examples = tokenize(cfg, client_records(cfg, pid, n_parts), tok, stats)

    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    if cfg["aggregation"] == "flora":
        merge_stack(model, w0, incoming)  # global model = W0 + stacked B @ A
        load_adapter_state(model, initial)  # fresh local adapter of this client's rank
    else:
        load_adapter_state(model, incoming)
    config = msg.content["config"]
    rnd = int(config.get("round-offset", 0)) + int(config["server-round"])
    steps = int(config.get("local-steps", cfg["local-steps"]))  # FedCompass may set it
    out = local_train(cfg, model, tok.pad_token_id, examples, context, rnd, pid, steps)
    records: dict[str, Any] = {"dp": out.pop("info")} if "info" in out else {}
    lr = out.pop("lr")
    reply = ArrayRecord({k: Array(v) for k, v in adapter_state(model, True).items()})
    metrics: dict[str, Any] = {
        "num-examples": len(examples),
        "train-loss": out["loss"],
        "train-last-loss": out["last-loss"],
        "tokens-per-s": out["tokens-per-s"],
        "lr": lr,
        "lora-r": rank,
        "lora-scaling": float(cfg["lora-alpha"]) / rank,
        "bytes-down": msg.content["arrays"].count_bytes(),
        "bytes-up-uncompressed": reply.count_bytes(),
        "skipped": sum(stats.skipped.values()),
        "truncated": stats.truncated,
    }
    metrics.update({k: v for k, v in out.items() if k.startswith("dp-")})
    content = RecordDict({"arrays": reply, "metrics": MetricRecord(metrics), **records})
    return Message(content=content, reply_to=msg)
