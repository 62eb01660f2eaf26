"""Run-config validation and the wiring from run-config keys to flwr_ext.llm objects.

The data, tokenization, learning-rate and evaluation keys it shares with sfprompt-llm are read by
:mod:`flwr_ext.llm.tasks`.

The defaults live in the app's ``pyproject.toml`` (``[tool.flwr.app.config]``); ``flwr run
--run-config`` or :func:`flwr_ext.sim.fused_run_config` override them. :data:`SETTINGS` holds
the rule of every key (:mod:`flwr_ext.settings`); :func:`validate` checks a run config once, at the
start of every ServerApp / ClientApp call, and raises a ``ValueError`` that names the key, the value
and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_ext.llm.lora import apply_lora, parse_layers
from flwr_ext.llm.models import DeviceConfig, load_model_and_tokenizer
from flwr_ext.settings import (
    ASYNC_ENGINE,
    ASYNC_ENGINE_RULES,
    LLM_TASK,
    LLM_TASK_RULES,
    SettingError,
    boolean,
    choice,
    compression_setting,
    integer,
    number,
    passthrough,
    text,
)
from flwr_ext.settings import validate as validate_settings

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


def _accountants() -> tuple[str, ...]:
    from flwr_ext.privacy.accounting import ACCOUNTANTS

    return tuple(ACCOUNTANTS)


def _check_flora_ranks(text: str) -> None:
    try:
        flora_ranks({"flora-ranks": text, "lora-r": 1})
    except ValueError:
        raise ValueError("expected comma-separated positive ints ('4,8') or ''") from None


def _check_lora_layers(text: str) -> None:
    # syntax only here; build_model checks the indices against the model's layers
    parse_layers(str(text or ""), num_layers=1 << 30)


SETTINGS = (
    *ASYNC_ENGINE,
    *LLM_TASK,
    integer("lora-r", low=1),
    number("lora-alpha", low=0, low_open=True),
    text("lora-targets", nonempty=True),
    number("lora-dropout", low=0, high=1, high_open=True),
    text("lora-layers", check=_check_lora_layers),  # "" | "last:4" | "26-29" | "0,5"
    choice("aggregation", AGGREGATIONS),
    text("flora-ranks", check=_check_flora_ranks),
    choice("strategy", STRATEGIES),
    number("fraction-train", low=0, high=1, low_open=True),
    integer("local-steps", low=1),
    number("fedadam-eta", low=0, low_open=True),
    number("fedadam-eta-l", low=0, low_open=True),
    number("fedadam-tau", low=0, low_open=True),
    integer("checkpoint-every", low=0),
    compression_setting(),
    boolean("progress"),
    # record-level DP-SGD (flwr_ext.privacy.DPConfig reads them; 0 = off)
    number("dp.target-epsilon", low=0),
    number("dp.delta", low=0, high=1, low_open=True, high_open=True),
    number("dp.max-grad-norm", low=0, low_open=True),
    choice("dp.accountant", _accountants),
    integer("dp.max-physical-batch-size", low=0),
    number("dp.noise-multiplier", low=0),
    integer("dp.expected-rounds", low=0),
    boolean("dp.insecure-reproducible"),  # seeded batches and noise: NOT private (tests)
    # client-level DP at the server (ClientLevelDP)
    number("dp.client-noise-multiplier", low=0),
    number("dp.client-clipping-norm", low=0, low_open=True),
    number("dp.client-delta", low=0, high=1, low_open=True, high_open=True),
    # placement of the base model: flwr_ext.llm.models.DeviceConfig checks them
    passthrough("device"),
    passthrough("dtype"),
    passthrough("quantization"),
    passthrough("gradient-checkpointing"),
)


def _combinations(cfg: dict[str, Any]) -> None:
    """Keys that are only wrong together (DP, FLoRA, compression, placement)."""
    from flwr_ext.privacy import DPConfig, check_dp_compression

    try:  # optional keys; CUDA itself is checked where the model is loaded (maybe a GPU node)
        placement = DeviceConfig.from_run_config(cfg)
    except ValueError as exc:
        raise ValueError(f"device/dtype/quantization run-config keys: {exc}") from None
    if placement.quantized and cfg["aggregation"] == "flora":
        raise ValueError("aggregation flora merges into the base weights: use quantization none")
    try:
        dp = DPConfig.from_run_config(cfg)
    except ValueError as exc:
        raise ValueError(f"dp.* run-config keys: {exc}") from None
    client_dp = client_level_dp(cfg)
    if client_dp and cfg["strategy"] != "fedavg":
        raise SettingError(
            "strategy", cfg["strategy"], "'fedavg' with dp.client-noise-multiplier > 0"
        )
    preset = cfg["compression"]
    # clip, noise, then compress: refuse data-dependent sparsification of un-noised updates
    check_dp_compression(preset, record_level=dp is not None, client_level=client_dp)
    if cfg["aggregation"] == "flora":
        if cfg["strategy"] != "fedavg":
            raise SettingError("strategy", cfg["strategy"], "'fedavg' with aggregation flora")
        if preset != "none" or client_dp:
            raise ValueError("aggregation flora works without compression and client-level DP")


def validate(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Check a run config against :data:`SETTINGS` and return it as a plain dict (converted).

    Keys that no rule names are kept (and reported in one warning).

    Raises
    ------
    ValueError
        A missing key or a value out of range, naming the key, the value and what is allowed.
    """
    cfg = dict(run_config)
    missing = [k for k in REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"run config lacks {missing}; start from apps/fedit-llm/pyproject.toml")
    cfg["compression"] = str(cfg["compression"] or "none")
    rules = (*ASYNC_ENGINE_RULES, *LLM_TASK_RULES, _combinations)
    return validate_settings(cfg, SETTINGS, rules, app="fedit-llm")


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
