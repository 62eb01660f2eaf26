"""Held-out evaluation: response loss, perplexity, exact match per category, sample outputs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flwr_ext.llm.synthetic import is_correct, normalize_answer
from flwr_ext.llm.templates import format_prompt
from flwr_ext.llm.train import response_loss


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, str]],
    template: str = "alpaca",
    max_new_tokens: int = 24,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to the records' prompts (batched with left padding)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(records), batch_size):
            chunk = records[i : i + batch_size]
            prompts = [
                format_prompt(r["instruction"], r.get("input", ""), template, tokenizer)
                for r in chunk
            ]
            enc = tokenizer(
                prompts,
                return_tensors="pt",
                padding=True,
                add_special_tokens=not template.startswith("chat"),
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            outs.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return outs


def exact_match(records: Sequence[dict[str, str]], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy overall (``"all"``) and per ``category``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for rec, pred in zip(records, predictions, strict=True):
        ok = is_correct(pred, rec["output"])
        hits["all"].append(ok)
        hits[rec.get("category", "default")].append(ok)
    return {k: sum(v) / len(v) for k, v in sorted(hits.items())}


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    records: Sequence[dict[str, str]],
    examples: Sequence[dict[str, list[int]]],
    template: str = "alpaca",
    max_new_tokens: int = 24,
    batch_size: int = 8,
    samples_path: str | Path | None = None,
    num_samples: int = 5,
    generate: bool = True,
) -> dict[str, float]:
    """Loss, perplexity and exact match per category on a held-out set.

    Parameters
    ----------
    records, examples
        The held-out records and their tokenized form (:func:`~flwr_ext.llm.data.tokenize_records`).
    samples_path : path, optional
        If given, the first ``num_samples`` prompts, references and generations are appended to
        this JSONL file.
    generate : bool
        Skip greedy generation (exact match) when False.

    Returns
    -------
    dict
        ``eval-loss``, ``eval-ppl``, ``eval-tokens``, and ``em`` / ``em-<category>``.
    """
    loss, n_tok = response_loss(model, examples, tokenizer.pad_token_id, batch_size)
    metrics = {"eval-loss": loss, "eval-ppl": math.exp(min(loss, 50.0)), "eval-tokens": n_tok}
    if generate and records:
        preds = generate_answers(model, tokenizer, records, template, max_new_tokens, batch_size)
        for k, v in exact_match(records, preds).items():
            metrics["em" if k == "all" else f"em-{k}"] = v
        if samples_path is not None:
            p = Path(samples_path)
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a", encoding="utf-8") as fh:
                for rec, pred in list(zip(records, preds, strict=True))[:num_samples]:
                    row = {
                        "category": rec.get("category"),
                        "instruction": rec["instruction"],
                        "input": rec.get("input", ""),
                        "reference": rec["output"],
                        "generation": pred,
                        "correct": normalize_answer(pred) == normalize_answer(rec["output"]),
                    }
                    fh.write(json.dumps(row) + "\n")
    return metrics
