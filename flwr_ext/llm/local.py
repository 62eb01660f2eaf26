"""One round of a client's local LoRA training as the fedit-llm app runs it (DP or not).

Shared by the fedit-llm ClientApp and the in-process search of ``baselines/dp-lora`` so both
train exactly alike; the app only wires run-config keys to this function.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context

from flwr_ext.llm.dp_train import train_lora_dp
from flwr_ext.llm.tasks import lr_at
from flwr_ext.llm.train import train_lora
from flwr_ext.privacy import DPConfig


def local_train(  # noqa: PLR0913
    cfg: Mapping[str, Any],
    model: torch.nn.Module,
    pad_token_id: int,
    examples: list,
    context: Context,
    rnd: int,
    pid: int,
    steps: int,
) -> dict[str, Any]:
    """Partition ``pid``'s local training in round ``rnd`` with the run config ``cfg``.

    Non-private :func:`~flwr_ext.llm.train.train_lora` (batches shuffled from the run seed), or
    record-level DP-SGD (:func:`~flwr_ext.llm.dp_train.train_lora_dp`, accountant in
    ``context.state``) when ``dp.target-epsilon > 0``: its Poisson batches and noise come from
    OS entropy unless ``dp.insecure-reproducible`` seeds them with ``(seed, rnd, pid)``.

    Returns
    -------
    dict
        The training loop's figures plus ``lr`` (and the DP ``info`` record under DP).
    """
    lr = lr_at(cfg, rnd)
    common = dict(steps=steps, batch_size=int(cfg["batch-size"]), lr=lr)
    dp = DPConfig.from_run_config(cfg)
    if dp is None:
        out = train_lora(
            model,
            examples,
            pad_token_id,
            progress=bool(cfg.get("progress", False)),
            desc=f"client {pid} round {rnd}",
            seed=int(cfg["seed"]) * 1_000_003 + rnd * 1009 + pid,
            **common,
        )
    else:
        expected = int(cfg.get("dp.expected-rounds", 0) or cfg["num-server-rounds"])
        out = train_lora_dp(
            model, examples, pad_token_id, context=context, dp=dp, expected_rounds=expected,
            seed=(int(cfg["seed"]), rnd, pid), **common,
        )  # fmt: skip
    return {**out, "lr": lr}
