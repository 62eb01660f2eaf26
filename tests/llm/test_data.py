"""Instruction data: layouts from local files, bad records, response-only masking, partitions."""

from __future__ import annotations

import csv
import json

import pytest

from flwr_ext.llm.data import (
    IGNORE_INDEX,
    BadRecordError,
    DataStats,
    ResponseOnlyCollator,
    load_instructions,
    tokenize_example,
    tokenize_records,
)
from flwr_ext.llm.partition import make_partitioner, partition_records
from flwr_ext.llm.synthetic import CATEGORIES, generate_tasks, is_correct
from flwr_ext.llm.templates import alpaca_prompt, format_prompt

ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5"},
    {"instruction": "Say hi.", "input": "", "output": "hi"},
]
DOLLY = [
    {"instruction": "Who?", "context": "Ann met Bob.", "response": "Ann", "category": "qa"},
    {"instruction": "Name a color.", "context": "", "response": "red", "category": "brainstorm"},
]
EXPECTED_ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 + 3", "output": "5", "category": "default"},
    {"instruction": "Say hi.", "input": "", "output": "hi", "category": "default"},
]
EXPECTED_DOLLY = [
    {"instruction": "Who?", "input": "Ann met Bob.", "output": "Ann", "category": "qa"},
    {"instruction": "Name a color.", "input": "", "output": "red", "category": "brainstorm"},
]


def _write(path, rows, fmt):
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    else:
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
@pytest.mark.parametrize(
    ("rows", "expected", "layout"),
    [(ALPACA, EXPECTED_ALPACA, "alpaca"), (DOLLY, EXPECTED_DOLLY, "dolly")],
)
def test_layouts_from_local_files(tmp_path, fmt, rows, expected, layout):
    path = tmp_path / f"data.{fmt}"
    _write(path, rows, fmt)
    assert load_instructions(path) == expected  # auto-detected
    assert load_instructions(path, layout=layout) == expected


def test_hub_path_via_datasets_on_local_json(tmp_path):
    path = tmp_path / "d.jsonl"
    _write(path, DOLLY, "jsonl")
    # the real `datasets.load_dataset` path, pointed at a local file (no network)
    got = load_instructions("json", data_files=str(path))
    assert got == EXPECTED_DOLLY


def test_bad_records_are_counted_or_raise(tmp_path):
    rows = [
        *ALPACA,
        {"instruction": "No output field"},
        {"instruction": "Empty", "input": "", "output": "   "},
        {"instruction": "", "input": "x", "output": "y"},
    ]
    path = tmp_path / "bad.jsonl"
    _write(path, rows, "jsonl")
    stats = DataStats()
    got = load_instructions(path, layout="alpaca", stats=stats)
    assert got == EXPECTED_ALPACA
    assert stats.kept == 2
    assert stats.skipped == {"missing-field": 1, "empty-response": 1, "empty-instruction": 1}
    with pytest.raises(BadRecordError, match="missing-field"):
        load_instructions(path, layout="alpaca", on_error="raise")
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.txt").write_text("hi")
        load_instructions(tmp_path / "x.txt")


def test_response_only_mask_is_exact(tok):
    rec = {"instruction": "Reverse the letters of the word.", "input": "abc", "output": "cba"}
    ex = tokenize_example(rec, tok, max_length=512)
    prompt_ids = tok(alpaca_prompt(rec["instruction"], rec["input"])).input_ids
    resp_ids = tok("cba", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ex["input_ids"] == prompt_ids + resp_ids
    assert ex["labels"] == [IGNORE_INDEX] * len(prompt_ids) + resp_ids
    n_prompt = sum(lab == IGNORE_INDEX for lab in ex["labels"])
    assert n_prompt == len(prompt_ids)
    assert tok.decode(ex["input_ids"][n_prompt:-1]) == "cba"


def test_chat_template_masking(tok):
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    ex = tokenize_example(rec, tok, template="chat")
    prompt = format_prompt("Say hi.", "", "chat", tok)
    assert prompt.endswith("<|im_start|>assistant\n")
    n_prompt = len(tok(prompt, add_special_tokens=False).input_ids)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex["labels"][n_prompt:]) == "hi<|endoftext|>"


def test_truncation_and_too_long_counted(tok):
    recs = [
        {"instruction": "Echo.", "input": "", "output": "word " * 50},
        {"instruction": "Echo. " * 100, "input": "", "output": "x"},
        {"instruction": "Echo.", "input": "", "output": "ok"},
    ]
    stats = DataStats()
    ex = tokenize_records(recs, tok, max_length=48, stats=stats)
    assert len(ex) == 2 and all(len(e["input_ids"]) <= 48 for e in ex)
    assert stats.skipped["too-long"] == 1 and stats.truncated == 1 and stats.tokenized == 2


def test_collator_pads_labels_with_ignore(tok):
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
        {"input_ids": [5], "labels": [5], "attention_mask": [1]},
    ]
    b = ResponseOnlyCollator(tok.pad_token_id)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, tok.pad_token_id, tok.pad_token_id]]
    assert b["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_synthetic_tasks_deterministic_balanced_and_checkable():
    a, b = generate_tasks(70, seed=3), generate_tasks(70, seed=3)
    assert a == b and a != generate_tasks(70, seed=4)
    cats = [r["category"] for r in a]
    assert {c: cats.count(c) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, 10)
    for r in a:
        if r["category"] == "arithmetic":
            x, op, y = r["input"].split()
            assert int(r["output"]) == eval(f"{int(x)} {op} {int(y)}")  # noqa: S307
        elif r["category"] == "reverse":
            assert r["output"] == r["input"][::-1]
        elif r["category"] == "sort":
            nums = [int(t) for t in r["input"].split(",")]
            assert r["output"] == ", ".join(map(str, sorted(nums)))
        elif r["category"] == "convert":
            assert isinstance(json.loads(r["output"]), dict)
        elif r["category"] == "extract":
            assert r["output"] in r["input"] and "@" in r["output"]
        assert is_correct(r["output"] + "\nextra", r["output"])
    keys = {(r["instruction"], r["input"]) for r in a}
    assert len(keys) == len(a)  # unique
    held_out = generate_tasks(70, seed=5, exclude=a)
    assert not keys & {(r["instruction"], r["input"]) for r in held_out}
    with pytest.raises(ValueError):
        generate_tasks(3, categories=["nope"])


def test_partitioners():
    recs = generate_tasks(140, seed=0)
    iid = make_partitioner("iid", 4)
    parts = [partition_records(recs, iid, i) for i in range(4)]
    assert sum(len(p) for p in parts) == 140 and all(len(p) == 35 for p in parts)

    cat = make_partitioner("category", 3, categories_per_partition=2)
    parts = [partition_records(recs, cat, i) for i in range(3)]
    for p in parts:
        assert len({r["category"] for r in p}) <= 2 and p
    seen = [r["instruction"] + r["input"] for p in parts for r in p]
    assert len(seen) == len(set(seen))  # disjoint

    nat = make_partitioner("natural", 0)
    parts = [partition_records(recs, nat, i) for i in range(len(CATEGORIES))]
    assert all(len({r["category"] for r in p}) == 1 for p in parts)

    dirich = make_partitioner("dirichlet", 3, alpha=0.3, min_partition_size=10, seed=1)
    parts = [partition_records(recs, dirich, i) for i in range(3)]
    assert min(len(p) for p in parts) >= 10 and sum(len(p) for p in parts) == 140
    with pytest.raises(ValueError):
        make_partitioner("nope", 2)


def test_short_templates_render_the_same_fields(tok):
    from flwr_ext.llm.templates import SHORT_SYSTEM, alpaca_short_prompt

    short = alpaca_short_prompt("Reverse the word.", "abc")
    assert short == "### Instruction:\nReverse the word.\n\n### Input:\nabc\n\n### Response:\n"
    assert alpaca_prompt("Reverse the word.", "abc").endswith(short)
    assert format_prompt("Say hi.", "", "alpaca-short") == alpaca_short_prompt("Say hi.")
    chat = format_prompt("Say hi.", "", "chat-short", tok)
    assert chat.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>system\n{SHORT_SYSTEM}<|im_end|>" in chat
    rec = {"instruction": "Say hi.", "input": "", "output": "hi"}
    ex = tokenize_example(rec, tok, template="chat-short")
    n_prompt = len(tok(chat, add_special_tokens=False).input_ids)
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(ex["labels"][n_prompt:]) == "hi<|endoftext|>"
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt("x", "", "nope")
