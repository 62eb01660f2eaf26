"""Run-config validation and the wiring from the app's keys to the split model.

The defaults live in the app's ``pyproject.toml`` (``[tool.flwr.app.config]``); ``flwr run
--run-config`` or :func:`flwr_ext.sim.fused_run_config` override them. The data, tokenization,
learning-rate and evaluation keys are fedit-llm's (same names, same defaults, same rules:
:data:`flwr_ext.settings.LLM_TASK`), read by :mod:`flwr_ext.llm.tasks`, so both apps train and
evaluate on the same task. :data:`SETTINGS` holds the rule of every key; :func:`validate` runs at
the start of the ServerApp and of every ClientApp handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr_ext.llm.lora import parse_targets
from flwr_ext.llm.models import load_model_and_tokenizer
from flwr_ext.llm.split import TAIL_MODES, SplitModel, split_causal_lm
from flwr_ext.settings import (
    LLM_TASK,
    LLM_TASK_RULES,
    boolean,
    choice,
    integer,
    number,
    text,
)
from flwr_ext.settings import validate as validate_settings

SETTINGS = (
    *LLM_TASK,
    integer("head-layers", low=0),
    integer("tail-layers", low=0),
    integer("num-virtual-tokens", low=1),
    choice("tail-mode", TAIL_MODES),
    integer("tail-lora-r", low=1),
    number("tail-lora-alpha", low=0, low_open=True),
    text("tail-lora-targets", nonempty=True),
    integer("split-steps", low=1),
    number("split-epochs", low=0),  # > 0 replaces split-steps
    integer("local-loss-steps", low=0),
    number("tail-learning-rate", low=0),  # 0: learning-rate
    number("prune-gamma", low=0, high=1, low_open=True),
    integer("prune-warmup-rounds", low=0),
    number("exchange-timeout", low=0, low_open=True),
    number("start-timeout", low=0, low_open=True),
    integer("min-nodes", low=1),
    boolean("eval-generate"),
)

#: Every key the app reads without a default; the defaults are in pyproject.toml.
REQUIRED = tuple(s.key for s in SETTINGS if s.key not in ("categories", "data-partitions",
                 "data-partition-ids", "tail-learning-rate"))  # fmt: skip


def validate(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Check every key against :data:`SETTINGS`; return the run config as a plain dict.

    Raises
    ------
    ValueError
        A missing key or a value that is not allowed, naming the key, the value and the rule.
    """
    return validate_settings(
        run_config, SETTINGS, LLM_TASK_RULES, app="sfprompt-llm", required=REQUIRED
    )


def build_split(cfg: Mapping[str, Any]) -> tuple[SplitModel, Any]:
    """Base model + tokenizer, split into head / body / tail as the config says."""
    model, tok = load_model_and_tokenizer(str(cfg["model"]), seed=int(cfg["model-seed"]))
    split = split_causal_lm(
        model,
        head_layers=int(cfg["head-layers"]),
        tail_layers=int(cfg["tail-layers"]),
        num_virtual_tokens=int(cfg["num-virtual-tokens"]),
        tail_mode=str(cfg["tail-mode"]),
        lora_r=int(cfg["tail-lora-r"]),
        lora_alpha=float(cfg["tail-lora-alpha"]),
        lora_targets=parse_targets(str(cfg["tail-lora-targets"])),
        seed=int(cfg["seed"]),
    )
    return split, tok
