"""Record-level DP-SGD for one round of local LoRA training, wired as docs/privacy.md prescribes.

Order: the base model is on its device before ``get_peft_model`` (load, then
:func:`flwr_ext.llm.lora.apply_lora`); ``DPLoRAEngine.from_context`` restores the accountant,
``make_private`` calibrates the noise once for the whole run and refuses a round that would
overspend the budget (``PrivacyBudgetExhausted``), the loss goes through
:func:`~flwr_ext.privacy.causal_lm_loss` (per-example token mean), and ``engine.save(context)``
persists the accountant before the reply. The non-private loop is
:func:`flwr_ext.llm.train.train_lora`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from flwr.app import Context
from torch.utils.data import DataLoader

from flwr_ext.llm.data import IGNORE_INDEX
from flwr_ext.privacy import DPConfig, DPLoRAEngine, causal_lm_loss

Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class PadTuples:
    """Pad ``(input_ids, labels, attention_mask)`` tuples to the longest in the batch.

    Tuples of tensors (not dicts) let Opacus build a correctly shaped empty batch when Poisson
    sampling draws no example, which the engine turns into a noise-only step.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: Sequence[Example]) -> Example:
        n = max(len(ids) for ids, _, _ in batch)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, n - len(t)), value=value)

        return (
            torch.stack([pad(ids, self.pad_token_id) for ids, _, _ in batch]),
            torch.stack([pad(lab, IGNORE_INDEX) for _, lab, _ in batch]),
            torch.stack([pad(m, 0) for _, _, m in batch]),
        )


def train_lora_dp(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    pad_token_id: int,
    *,
    context: Context,
    dp: DPConfig,
    steps: int,
    expected_rounds: int,
    batch_size: int,
    lr: float,
    seed: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """One round of record-level DP-SGD (AdamW on the noised gradients) on the adapter.

    Parameters
    ----------
    model : PeftModel
        Already on its device; only adapter parameters trainable.
    examples : sequence of dict
        Tokenized examples (``input_ids``, ``labels``, ``attention_mask``).
    context : Context
        The ClientApp's context: the accountant lives in ``context.state``.
    dp : DPConfig
        Budget and clipping (``DPConfig.from_run_config``).
    steps, expected_rounds : int
        Logical DP-SGD steps this round; rounds this client expects to train (noise calibration).
    batch_size : int
        Expected (Poisson) logical batch size: the sample rate is ``batch_size / len(examples)``.
    seed : int, sequence of int or None
        Used only when ``dp.insecure_reproducible`` is set (then required): Poisson batches and
        noise are drawn from generators seeded by it. By default both come from OS entropy and
        the seed is ignored, so nobody who knows the run config can recompute the batches.

    Returns
    -------
    dict
        ``loss``, ``last-loss``, ``tokens``, ``tokens-per-s``, ``steps``, ``seconds`` and
        ``engine.metrics()`` (``dp-epsilon`` cumulative over the run, ...), ``info`` (the
        ``ConfigRecord`` naming the accountant and guarantee).

    Raises
    ------
    PrivacyBudgetExhausted
        When this round would exceed the budget (nothing is consumed).
    """
    if not examples:
        raise ValueError("no training examples")
    data = [
        tuple(torch.tensor(e[k]) for k in ("input_ids", "labels", "attention_mask"))
        for e in examples
    ]
    # no generator here: the engine draws the Poisson batches from a secret source
    loader = DataLoader(data, batch_size=batch_size, collate_fn=PadTuples(pad_token_id))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    engine = DPLoRAEngine.from_context(context, dp)
    model.train()  # Opacus validates training mode
    dp_model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        steps_per_round=steps,
        expected_rounds=expected_rounds,
        seed=seed,
    )
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    try:
        for ids, labels, mask in engine.batches(loader, optimizer):
            optimizer.zero_grad()
            logits = dp_model(input_ids=ids, attention_mask=mask).logits
            loss = causal_lm_loss(logits, labels)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            tokens += int(mask.sum())
    finally:
        dp_model._close()  # drop Opacus hooks: the cached PEFT model is reused next round
        model.eval()
    dt = time.perf_counter() - t0
    steps_taken = engine.steps_taken  # before save(): it folds this round into the history
    engine.save(context)
    return {
        "loss": sum(losses) / len(losses) if losses else float("nan"),
        "last-loss": losses[-1] if losses else float("nan"),
        "tokens": tokens,
        "tokens-per-s": tokens / dt if dt > 0 else 0.0,
        "steps": steps_taken,
        "seconds": dt,
        **engine.metrics(),
        "info": engine.info_record(),
    }
