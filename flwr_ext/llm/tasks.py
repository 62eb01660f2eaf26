"""The instruction task of the LLM apps, as their shared run-config keys describe it.

fedit-llm and sfprompt-llm train and evaluate on the same task with the same keys (``dataset``,
``num-train-examples``, ``partitioner``, ``template``, ``max-length``, ``learning-rate``,
``eval-*``, ...; defaults in each app's ``pyproject.toml``). These functions turn those keys into
the held-out split, one client's partition, tokenized examples, the learning rate of a round and
the held-out evaluation, so both apps read them the same way.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from flwr_ext.llm.data import DataStats, load_instructions, tokenize_records
from flwr_ext.llm.evaluate import evaluate_model
from flwr_ext.llm.partition import make_partitioner, partition_records
from flwr_ext.llm.synthetic import generate_tasks
from flwr_ext.llm.train import round_lr

DATA_KEYS = (
    "dataset",
    "dataset-layout",
    "num-train-examples",
    "num-eval-examples",
    "eval-fraction",
    "seed",
    "categories",
)
# Optional keys (an app whose pyproject lacks them gets these values).
DATA_DEFAULTS: dict[str, Any] = {"categories": ""}


def categories_of(cfg: Mapping[str, Any]) -> list[str] | None:
    """``categories = "extract,convert"``: the synthetic categories to generate (``""``: all)."""
    text = str(cfg.get("categories", "") or "").strip()
    return [c.strip() for c in text.split(",") if c.strip()] or None


@lru_cache(maxsize=4)
def _split(key: tuple) -> tuple[list[dict], list[dict], dict[str, int]]:
    cfg = dict(key)
    seed = int(cfg["seed"])
    if cfg["dataset"] == "synthetic":
        cats = categories_of(cfg)
        train = generate_tasks(int(cfg["num-train-examples"]), seed=seed, categories=cats)
        held = generate_tasks(
            int(cfg["num-eval-examples"]), seed=seed + 1, categories=cats, exclude=train
        )
        return train, held, {"kept": len(train)}
    stats = DataStats()
    recs = load_instructions(str(cfg["dataset"]), layout=str(cfg["dataset-layout"]), stats=stats)
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(round(float(cfg["eval-fraction"]) * len(recs))))
    held = [recs[i] for i in order[:n_eval]]
    train = [recs[i] for i in order[n_eval:]]
    return train, held, stats.as_dict()


def train_eval_records(cfg: Mapping[str, Any]) -> tuple[list[dict], list[dict], dict[str, int]]:
    """``(train records, held-out records, load stats)``, deterministic in the config.

    ``dataset = "synthetic"`` generates ``num-train-examples`` and ``num-eval-examples`` disjoint
    tasks (balanced over ``categories``, default all); a file or hub dataset is shuffled with
    ``seed`` and ``eval-fraction`` of it held out.
    """
    return _split(tuple((k, cfg.get(k, DATA_DEFAULTS.get(k))) for k in DATA_KEYS))


def data_partition(
    cfg: Mapping[str, Any], partition_id: int, num_partitions: int
) -> tuple[int, int]:
    """The data partition a node trains on: ``(partition id, number of partitions)``.

    By default one partition per node (the node's ``partition-id`` of ``num-partitions``). With
    ``data-partitions = K`` the data is split ``K`` ways whatever the number of nodes, and
    ``data-partition-ids = "2"`` (or ``"0,2"``) maps node ``i`` to data partition ``ids[i]``: a
    one-node run on partition 2 of 3 is that client training alone (the local-only baseline of
    FedIT), with the same training code, schedule and evaluation as the federated run.
    """
    k = int(cfg.get("data-partitions", 0) or 0)
    text = str(cfg.get("data-partition-ids", "") or "").strip()
    ids = [int(i) for i in text.split(",") if i.strip()]
    if k <= 0:
        if ids:
            raise ValueError("data-partition-ids needs data-partitions > 0")
        return partition_id, num_partitions
    pid = ids[partition_id] if ids else partition_id
    if not 0 <= pid < k:
        raise ValueError(f"data partition {pid} of node {partition_id} not in [0, {k})")
    return pid, k


def client_records(cfg: Mapping[str, Any], partition_id: int, num_partitions: int) -> list[dict]:
    """The training records of one client, partitioned with flwr-datasets."""
    partition_id, num_partitions = data_partition(cfg, partition_id, num_partitions)
    train, _, _ = train_eval_records(cfg)
    partitioner = make_partitioner(
        str(cfg["partitioner"]),
        num_partitions,
        categories_per_partition=int(cfg["categories-per-partition"]),
        alpha=float(cfg["dirichlet-alpha"]),
        min_partition_size=int(cfg["min-partition-size"]),
        seed=int(cfg["seed"]),
    )
    return partition_records(train, partitioner, partition_id)


def tokenize(cfg: Mapping[str, Any], records: list[dict], tok: Any, stats: DataStats | None = None):
    """Tokenize records with the configured template and max length (skips are counted)."""
    return tokenize_records(records, tok, int(cfg["max-length"]), str(cfg["template"]), stats=stats)


def lr_at(cfg: Mapping[str, Any], server_round: int) -> float:
    """The clients' learning rate in ``server_round``: ``lr-schedule`` across the rounds."""
    return round_lr(
        float(cfg["learning-rate"]),
        server_round,
        int(cfg["num-server-rounds"]),
        str(cfg["lr-schedule"]),
        float(cfg["min-learning-rate"]),
    )


def evaluate(
    cfg: Mapping[str, Any],
    model: torch.nn.Module,
    tok: Any,
    held_out: Sequence[dict[str, str]],
    examples: Sequence[dict[str, list[int]]],
    out_dir: str | Path,
    generate: bool = True,
) -> dict[str, float]:
    """:func:`~flwr_ext.llm.evaluate.evaluate_model` with the ``eval-*`` keys.

    Sample generations are appended to ``<out_dir>/samples.jsonl``. ``generate=False`` skips
    generation (exact match) in this call even when ``eval-generate`` is on.
    """
    return evaluate_model(
        model,
        tok,
        held_out,
        examples,
        template=str(cfg["template"]),
        max_new_tokens=int(cfg["eval-max-new-tokens"]),
        batch_size=int(cfg["eval-batch-size"]),
        samples_path=Path(out_dir) / "samples.jsonl",
        num_samples=int(cfg["eval-num-samples"]),
        generate=bool(cfg["eval-generate"]) and generate,
    )
