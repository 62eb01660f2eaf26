"""Local LoRA training loop and the learning-rate schedule across server rounds.

The loops are device-agnostic: they follow the model's device (:func:`model_device`) and move
each CPU-collated batch there (:func:`to_device`); where the model goes is decided once, when it
is loaded (:class:`flwr_ext.llm.models.DeviceConfig`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from flwr_ext.llm.data import IGNORE_INDEX, ResponseOnlyCollator

SCHEDULES = ("constant", "cosine", "linear")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (asynchronous copies from pinned memory where possible)."""
    non_blocking = device.type != "cpu"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def round_lr(
    base_lr: float,
    server_round: int,
    num_rounds: int,
    schedule: str = "constant",
    min_lr: float = 0.0,
) -> float:
    """Learning rate for ``server_round`` (1-based) of ``num_rounds``.

    ``cosine`` decays from ``base_lr`` to ``min_lr`` over the rounds (as FlowerTune does),
    ``linear`` decays linearly, ``constant`` keeps ``base_lr``.
    """
    if schedule == "constant" or num_rounds <= 1:
        return base_lr
    frac = min(max((server_round - 1) / (num_rounds - 1), 0.0), 1.0)
    if schedule == "cosine":
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * frac))
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * frac
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {SCHEDULES}")


def train_lora(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    steps: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> dict[str, Any]:
    """Run ``steps`` optimizer steps of AdamW on the trainable (adapter) parameters.

    Batches are drawn from a seeded shuffle of ``examples``, cycling when exhausted. The loss is
    the model's token-mean cross-entropy on the response tokens (labels ``-100`` elsewhere).
    Runs on the model's device (load the base there before ``apply_lora``: the optimizer is
    built here, on the adapter as it is). Per-step losses stay on the device until the end, so a
    GPU is not synchronised every step unless the progress bar shows them.

    Returns
    -------
    dict
        ``loss`` (mean over steps), ``last-loss``, ``tokens`` (non-pad input tokens processed),
        ``tokens-per-s``, ``steps``, ``seconds``.
    """
    if not examples:
        raise ValueError("no training examples")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        list(examples),
        batch_size=batch_size,
        shuffle=True,
        generator=gen,
        collate_fn=ResponseOnlyCollator(pad_token_id),
    )
    device = model_device(model)
    model.train()
    losses: list[torch.Tensor] = []
    tokens = 0
    t0 = time.perf_counter()
    it = iter(loader)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, leave=False)
    for _ in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
        out = model(**to_device(batch, device))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        losses.append(out.loss.detach())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses[-1]):.3f}")
    if bar is not None:
        bar.close()
    values = torch.stack(losses).float().cpu().tolist() if losses else []  # waits for the device
    model.eval()
    dt = time.perf_counter() - t0
    return {
        "loss": float(sum(values) / len(values)) if values else float("nan"),
        "last-loss": values[-1] if values else float("nan"),
        "tokens": tokens,
        "tokens-per-s": tokens / dt if dt > 0 else 0.0,
        "steps": len(values),
        "seconds": dt,
    }


@torch.no_grad()
def response_loss(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    batch_size: int = 8,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over the response tokens: ``(loss, n_tokens)``."""
    model.eval()
    device = model_device(model)
    collate = ResponseOnlyCollator(pad_token_id)
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[i : i + batch_size]), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logits = logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(loss)
        count += int((labels != IGNORE_INDEX).sum())
    return (total / count if count else float("nan")), count
