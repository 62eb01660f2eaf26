"""Run-config validation and the wiring from run-config keys to flwr_ext.llm objects.

The data, tokenization, learning-rate and evaluation keys it shares with sfprompt-llm are read by
:mod:`flwr_ext.llm.tasks`.

The defaults live in the app's ``pyproject.toml`` (``[tool.flwr.app.config]``); ``flwr run
--run-config`` or :func:`flwr_ext.sim.fused_run_config` override them. :func:`validate` checks a
run config once, at the start of every ServerApp / ClientApp call, and raises ``ValueError`` with
the offending key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_ext.llm.lora import apply_lora, parse_layers
from flwr_ext.llm.models import DeviceConfig, load_model_and_tokenizer
from flwr_ext.llm.templates import TEMPLATES
from flwr_ext.llm.train import SCHEDULES

AGGREGATIONS = ("fedit", "ffa", "flora")
STRATEGIES = ("fedavg", "fedadam", "fedavg-timed", "fedasync", "fedbuff", "fedcompass")
FLOWER_STRATEGIES = ("fedavg", "fedadam")
PARTITIONERS = ("iid", "category", "natural", "dirichlet")

REQUIRED = (
    "model", "model-seed", "dataset", "dataset-layout", "num-train-examples", "num-eval-examples",
    "eval-fraction", "template", "max-length", "partitioner", "categories-per-partition",
    "dirichlet-alpha", "min-partition-size", "lora-r", "lora-alpha", "lora-targets",
    "lora-dropout", "aggregation", "strategy", "fraction-train", "min-train-nodes",
    "num-server-rounds", "local-steps", "batch-size", "learning-rate", "lr-schedule",
    "min-learning-rate", "checkpoint-every", "output-dir", "compression", "seed",
)  # fmt: skip


def _positive(cfg: Mapping[str, Any], key: str, kind: type = int, zero: bool = False) -> None:
    try:
        value = kind(cfg[key])
    except (TypeError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} must be {what}, got {cfg[key]!r}") from None
    if value < 0 or (value == 0 and not zero):
        raise ValueError(f"{key} must be {'>= 0' if zero else '> 0'}, got {cfg[key]!r}")


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> None:
    if str(cfg[key]).lower() not in choices:
        raise ValueError(f"{key} must be one of {choices}, got {cfg[key]!r}")


def flora_ranks(cfg: Mapping[str, Any]) -> list[int]:
    """``flora-ranks = "4,8"``: the LoRA rank of partition ``i`` is ``ranks[i % len(ranks)]``.

    Empty (the default): every client uses ``lora-r``.
    """
    text = str(cfg.get("flora-ranks", "") or "").strip()
    if not text:
        return [int(cfg["lora-r"])]
    try:
        ranks = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"flora-ranks must be comma-separated ints, got {text!r}") from None
    if not ranks or any(r <= 0 for r in ranks):
        raise ValueError(f"flora-ranks must be positive ints, got {text!r}")
    return ranks


def client_rank(cfg: Mapping[str, Any], partition_id: int) -> int:
    """LoRA rank of a client (heterogeneous under FLoRA, ``lora-r`` otherwise)."""
    if cfg["aggregation"] != "flora":
        return int(cfg["lora-r"])
    ranks = flora_ranks(cfg)
    return ranks[partition_id % len(ranks)]


def client_level_dp(cfg: Mapping[str, Any]) -> bool:
    """Whether the server adds client-level DP noise (``dp.client-noise-multiplier > 0``)."""
    return float(cfg.get("dp.client-noise-multiplier", 0) or 0) > 0


def validate(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a run config and return it as a plain dict.

    Keys not listed in the app's pyproject are kept: flwr-ext's async strategies read their own
    (``buffer-size``, ``staleness``, ``clock``, ...).

    Raises
    ------
    ValueError
        A missing key or a value out of range, naming the key.
    """
    from flwr_ext.compression import PRESETS
    from flwr_ext.privacy import DPConfig, check_dp_compression

    cfg = dict(run_config)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"run config lacks {missing}; start from apps/fedit-llm/pyproject.toml")
    cfg["aggregation"] = str(cfg["aggregation"]).lower()
    cfg["strategy"] = str(cfg["strategy"]).lower()
    _choice(cfg, "aggregation", AGGREGATIONS)
    _choice(cfg, "strategy", STRATEGIES)
    _choice(cfg, "template", TEMPLATES)
    _choice(cfg, "partitioner", PARTITIONERS)
    _choice(cfg, "lr-schedule", SCHEDULES)
    for key in ("num-server-rounds", "local-steps", "batch-size", "lora-r", "max-length"):
        _positive(cfg, key)
    for key in ("learning-rate", "lora-alpha"):
        _positive(cfg, key, float)
    _positive(cfg, "min-learning-rate", float, zero=True)
    _positive(cfg, "checkpoint-every", int, zero=True)
    if not 0 < float(cfg["fraction-train"]) <= 1:
        raise ValueError(f"fraction-train must be in (0, 1], got {cfg['fraction-train']!r}")
    preset = str(cfg["compression"] or "none")
    if preset not in PRESETS:
        raise ValueError(f"compression must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg["compression"] = preset
    flora_ranks(cfg)
    try:  # optional keys; CUDA itself is checked where the model is loaded (maybe a GPU node)
        placement = DeviceConfig.from_run_config(cfg)
    except ValueError as exc:
        raise ValueError(f"device/dtype/quantization run-config keys: {exc}") from None
    if placement.quantized and cfg["aggregation"] == "flora":
        raise ValueError("aggregation flora merges into the base weights: use quantization none")
    try:  # syntax only here; build_model checks the indices against the model's layers
        parse_layers(str(cfg.get("lora-layers", "") or ""), num_layers=1 << 30)
    except ValueError as exc:
        raise ValueError(f"lora-layers: {exc}") from None
    try:
        dp = DPConfig.from_run_config(cfg)
    except ValueError as exc:
        raise ValueError(f"dp.* run-config keys: {exc}") from None
    client_dp = client_level_dp(cfg)
    if client_dp:
        _positive(cfg, "dp.client-clipping-norm", float)
        if cfg["strategy"] != "fedavg":
            raise ValueError("dp.client-noise-multiplier (client-level DP) needs strategy fedavg")
    # clip, noise, then compress: refuse data-dependent sparsification of un-noised updates
    check_dp_compression(preset, record_level=dp is not None, client_level=client_dp)
    if cfg["aggregation"] == "flora":
        if cfg["strategy"] != "fedavg":
            raise ValueError("aggregation flora stacks synchronous rounds: use strategy fedavg")
        if preset != "none" or client_dp:
            raise ValueError("aggregation flora works without compression and client-level DP")
    return cfg


def build_model(cfg: Mapping[str, Any], rank: int | None = None):
    """Base model + tokenizer + LoRA adapter as the config says (FFA freezes ``lora_A``).

    The base is loaded onto its device (run-config keys ``device``, ``dtype``, ``quantization``,
    ``gradient-checkpointing``: :class:`~flwr_ext.llm.models.DeviceConfig`) before
    ``get_peft_model``; nothing moves it afterwards, which is the order Opacus needs (issue 820).
    """
    placement = DeviceConfig.from_run_config(cfg)
    model, tok = load_model_and_tokenizer(
        str(cfg["model"]), seed=int(cfg["model-seed"]), placement=placement
    )
    r = int(cfg["lora-r"]) if rank is None else rank
    peft_model = apply_lora(
        model,
        r=r,
        alpha=float(cfg["lora-alpha"]),
        targets=str(cfg["lora-targets"]),
        dropout=float(cfg["lora-dropout"]),
        ffa=cfg["aggregation"] == "ffa",
        seed=int(cfg["seed"]),
        layers=str(cfg.get("lora-layers", "") or ""),
    )
    return peft_model, tok
