"""Instruction data: Alpaca / Dolly layouts from files or hub ids, tokenization, collation.

Records are normalised to the Alpaca layout (``instruction``, ``input``, ``output``) plus a
``category``. Dolly's ``context``/``response`` map to ``input``/``output`` (Conover et al. 2023,
"Free Dolly"). Training examples put the loss on the response tokens only: the prompt positions
carry label ``-100`` (the standard instruction-tuning objective also used by FedIT, Zhang et al.
2023, "Towards Building the Federated GPT").

Bad records are never silently dropped: every skip is counted by reason in :class:`DataStats`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flwr_ext.llm.templates import format_prompt

IGNORE_INDEX = -100
LAYOUTS = ("auto", "alpaca", "dolly")
_FIELDS = {
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
}


@dataclass
class DataStats:
    """Counts of kept and skipped records, by reason."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    tokenized: int = 0
    truncated: int = 0

    def as_dict(self) -> dict[str, int]:
        out = {"kept": self.kept, "tokenized": self.tokenized, "truncated": self.truncated}
        out.update({f"skipped-{k}": v for k, v in sorted(self.skipped.items())})
        return out


class BadRecordError(ValueError):
    """A record that cannot be used, raised when ``on_error="raise"``."""


def detect_layout(record: dict[str, Any]) -> str:
    """``"dolly"`` if the record has ``response`` or ``context``, else ``"alpaca"``."""
    return "dolly" if ("response" in record or "context" in record) else "alpaca"


def read_records(source: str | Path, split: str = "train", **load_kwargs: Any) -> list[dict]:
    """Read raw records from a ``.json``/``.jsonl``/``.csv`` file or a ``datasets`` hub id.

    Parameters
    ----------
    source : str or Path
        A local file, or a hub id such as ``"tatsu-lab/alpaca"`` or
        ``"databricks/databricks-dolly-15k"`` (read with ``datasets.load_dataset``; needs network
        unless cached).
    split : str
        Split of a hub dataset.
    """
    p = Path(source)
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
            data = data.get(split, data.get("data"))
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of records")
        return data
    if p.suffix == ".csv":
        with open(p, encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    if p.exists():
        raise ValueError(f"unsupported file type {p.suffix!r}: use .json, .jsonl or .csv")
    from datasets import load_dataset

    return list(load_dataset(str(source), split=split, **load_kwargs))


def normalize_records(
    raw: Iterable[dict[str, Any]],
    layout: str = "auto",
    on_error: str = "skip",
    stats: DataStats | None = None,
) -> list[dict[str, str]]:
    """Map raw Alpaca or Dolly records to ``{instruction, input, output, category}``.

    Records without an instruction or output field, or with an empty instruction or response,
    are skipped and counted (``on_error="skip"``) or raise :class:`BadRecordError`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    stats = stats if stats is not None else DataStats()
    out = []
    for i, rec in enumerate(raw):
        lay = detect_layout(rec) if layout == "auto" else layout
        f_ins, f_in, f_out = _FIELDS[lay]
        reason = None
        if f_ins not in rec or f_out not in rec:
            reason = "missing-field"
        elif not str(rec[f_ins] or "").strip():
            reason = "empty-instruction"
        elif not str(rec[f_out] or "").strip():
            reason = "empty-response"
        if reason is not None:
            if on_error == "raise":
                raise BadRecordError(f"record {i}: {reason} ({lay} layout needs {_FIELDS[lay]})")
            stats.skipped[reason] += 1
            continue
        out.append(
            {
                "instruction": str(rec[f_ins]),
                "input": str(rec.get(f_in) or ""),
                "output": str(rec[f_out]),
                "category": str(rec.get("category") or "default"),
            }
        )
        stats.kept += 1
    return out


def load_instructions(
    source: str | Path,
    layout: str = "auto",
    split: str = "train",
    on_error: str = "skip",
    stats: DataStats | None = None,
    **load_kwargs: Any,
) -> list[dict[str, str]]:
    """Read and normalise instruction records (see :func:`read_records`)."""
    return normalize_records(read_records(source, split, **load_kwargs), layout, on_error, stats)


def tokenize_example(
    record: dict[str, str],
    tokenizer: Any,
    max_length: int = 256,
    template: str = "alpaca",
) -> dict[str, list[int]] | None:
    """Tokenize one record with labels on the response (and the closing EOS) only.

    Prompt and response are tokenized separately and concatenated, so the boundary is exact
    whatever merges the tokenizer would do across it. Over-long examples are truncated from the
    right; if no response token survives, ``None`` is returned (the caller counts it).
    """
    prompt = format_prompt(record["instruction"], record.get("input", ""), template, tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=not template.startswith("chat")).input_ids
    r_ids = tokenizer(record["output"], add_special_tokens=False).input_ids
    if tokenizer.eos_token_id is not None:
        r_ids = [*r_ids, tokenizer.eos_token_id]
    ids = (p_ids + r_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + r_ids)[:max_length]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


def tokenize_records(
    records: Sequence[dict[str, str]],
    tokenizer: Any,
    max_length: int = 256,
    template: str = "alpaca",
    stats: DataStats | None = None,
) -> list[dict[str, list[int]]]:
    """Tokenize records; records whose response does not fit are skipped and counted."""
    stats = stats if stats is not None else DataStats()
    out = []
    for rec in records:
        ex = tokenize_example(rec, tokenizer, max_length, template)
        if ex is None:
            stats.skipped["too-long"] += 1
            continue
        n_resp = len(tokenizer(rec["output"], add_special_tokens=False).input_ids) + 1
        if sum(lab != IGNORE_INDEX for lab in ex["labels"]) < n_resp:
            stats.truncated += 1
        stats.tokenized += 1
        out.append(ex)
    return out


@dataclass
class ResponseOnlyCollator:
    """Pad a batch: ``pad_token_id`` for inputs, ``-100`` for labels, ``0`` for the mask."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            n = -(-n // self.pad_to_multiple_of) * self.pad_to_multiple_of

        def pad(seq: list[int], value: int) -> list[int]:
            return list(seq) + [value] * (n - len(seq))

        return {
            "input_ids": torch.tensor([pad(f["input_ids"], self.pad_token_id) for f in features]),
            "labels": torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features]),
            "attention_mask": torch.tensor([pad(f["attention_mask"], 0) for f in features]),
        }
