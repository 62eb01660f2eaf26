"""Bidirectional compression on the digits CNN: total bytes (up + down) and accuracy per update.

The setting of this folder's uplink table (``run.py``): DigitsCNN, embedded digits, 4 IID
clients, all clients every round, one local epoch of momentum SGD (lr 0.05, m 0.9, batch 16),
Flower's ``FedAvg`` wrapped in ``Compressed``. Flower's strategy objects and the client mod on
real ``flwr.app.Message`` objects, driven in-process round by round (no Ray; the same wiring
as a ClientApp with ``mods=[compression_mod(...)]``), so 5 seeds fit in minutes on one core:

* ``dense``        ``Compressed(FedAvg)``, ``compression_mod("none")``: the dense model both ways;
* ``up``           uplink ``fedzip`` only (the issue-4 row);
* ``bidir``        uplink ``fedzip`` + downlink EF21-P (``Compressed(..., downlink=DOWN)``);
                   each node's first message is the dense model;
* ``bidir-known``  the same, but the nodes build the initial model from the shared seed
                   (``downlink_initial="known"``, ``compression_mod(initial=...)``, checked by
                   checksum), so no message is dense.

Bytes are ``ArrayRecord.count_bytes()`` of every train message and reply (the wrapper's one
``ByteCounter``); "per update" is (uplink + downlink) / (rounds x clients).

Run (about 3 minutes for 5 seeds x 4 methods x 30 rounds on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python baselines/fedzip/run_bidir.py      # 5 seeds, 30 rounds
    OMP_NUM_THREADS=1 .venv/bin/python baselines/fedzip/run_bidir.py --seeds 0 --rounds 5

Writes ``results-bidir/<method>-s<seed>-r<rounds>.json`` (accuracy and cumulative bytes both ways
after every round) and ``results-bidir/table.md``; ``--report-only`` rebuilds the table from the
JSONs. The table and its reading are in ``README.md`` ("Both ways").
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_ext.asyncfl.testing import NodeListGrid, task_identity
from flwr_ext.compression import Compressed, compression_mod
from flwr_ext.data.images import load_partition, load_test_set, to_tensors
from flwr_ext.vision.model import DigitsCNN
from flwr_ext.vision.train import evaluate, train_local

HERE = Path(__file__).resolve().parent
METHODS = ("dense", "up", "bidir", "bidir-known")
NODES, UP, DOWN = 4, "fedzip", "fedzip"


def _arrays(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _initial(seed: int) -> dict[str, np.ndarray]:
    """The initial model, built the same way on the server and (``bidir-known``) on nodes."""
    torch.manual_seed(seed)
    return _arrays(DigitsCNN())


def _trainer(data, seed: int, rnd: int):
    """The ClientApp of apps/async-vision, reduced to its train step."""

    def call_next(msg: Message, ctx: Context) -> Message:
        x, y = data[ctx.node_id]
        model = DigitsCNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        train_local(
            model,
            x,
            y,
            epochs=1,
            batch_size=16,
            lr=0.05,
            momentum=0.9,
            seed=seed * 100_003 + rnd * 1_009 + ctx.node_id,
        )
        content = RecordDict(
            {
                "arrays": ArrayRecord(model.state_dict()),
                "metrics": MetricRecord({"num-examples": len(y)}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def run(method: str, seed: int, rounds: int, up: str = UP, down: str = DOWN) -> dict:
    """One run; returns test accuracy and cumulative bytes both ways after every round."""
    data = {
        n: to_tensors(load_partition("digits", n, NODES, partitioner="iid", seed=seed))
        for n in range(NODES)
    }
    xte, yte = to_tensors(load_test_set("digits", seed=seed))
    fedavg = FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES)
    kind = {"dense": ("none", None), "up": (up, None)}.get(method, (up, down))
    strategy = Compressed(
        fedavg,
        downlink=kind[1],
        downlink_initial="known" if method == "bidir-known" else "dense",
    )
    mod = compression_mod(kind[0], initial=lambda ctx: _initial(seed))
    ctxs = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in range(NODES)
    }
    arrays = ArrayRecord({k: Array(v) for k, v in _initial(seed).items()})
    model = DigitsCNN()
    grid = NodeListGrid(list(range(NODES)))
    acc, ups, downs, dense_sends = [], [], [], 0
    for rnd in range(1, rounds + 1):
        torch.manual_seed(seed * 7919 + rnd)
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        call = _trainer(data, seed, rnd)
        replies = [mod(m, ctxs[m.metadata.dst_node_id], call) for m in msgs]
        new, metrics = strategy.aggregate_train(rnd, replies)
        arrays = new if new is not None else arrays
        model.load_state_dict(arrays.to_torch_state_dict())
        acc.append(evaluate(model, xte, yte)[1])
        ups.append(strategy.bytes.uplink_total)
        downs.append(strategy.bytes.downlink_total)
        dense_sends += int(metrics.get("downlink-new", 0)) + int(
            metrics.get("downlink-resynced", 0)
        )
    return {
        "method": method,
        "seed": seed,
        "uplink": up if method != "dense" else "none",
        "downlink": kind[1] or "none",
        "accuracy": acc,
        "uplink-cumulative": ups,
        "downlink-cumulative": downs,
        "dense-downlink-sends": dense_sends,
    }


def table(results: list[dict], checkpoints: list[int]) -> str:
    """Per checkpoint and method: bytes per update both ways, ratio to dense, accuracy delta."""
    dense = {r["seed"]: r for r in results if r["method"] == "dense"}
    lines = [
        "| method | updates | up B/update | down B/update | total B/update | fewer total bytes "
        "than dense | accuracy (mean) | Δ vs dense per seed (points) | goal met on seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        rs = sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"])
        if not rs:
            continue
        for c in checkpoints:
            n = c * NODES
            upb = np.mean([r["uplink-cumulative"][c - 1] / n for r in rs])
            dnb = np.mean([r["downlink-cumulative"][c - 1] / n for r in rs])
            met, deltas, ratios = 0, [], []
            for r in rs:
                d = dense[r["seed"]]
                tot = r["uplink-cumulative"][c - 1] + r["downlink-cumulative"][c - 1]
                dtot = d["uplink-cumulative"][c - 1] + d["downlink-cumulative"][c - 1]
                delta = 100 * (r["accuracy"][c - 1] - d["accuracy"][c - 1])
                ratios.append(dtot / tot)
                deltas.append(delta)
                met += dtot / tot >= 100 and delta >= -1.0
            acc = np.mean([r["accuracy"][c - 1] for r in rs]) * 100
            lines.append(
                f"| {m} | {n} | {upb:,.0f} | {dnb:,.0f} | {upb + dnb:,.0f} | "
                f"{min(ratios):.0f}x-{max(ratios):.0f}x | {acc:.1f} | "
                f"{' / '.join(f'{d:+.1f}' for d in deltas)} | "
                f"{'-' if m == 'dense' else f'{met}/{len(rs)}'} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--up", default=UP, help="uplink preset spec")
    ap.add_argument("--down", default=DOWN, help="downlink preset spec")
    ap.add_argument("--checkpoints", type=int, nargs="+", help="rounds to tabulate")
    ap.add_argument("--out", type=Path, default=HERE / "results-bidir")
    ap.add_argument("--report-only", action="store_true", help="table from the saved JSONs")
    args = ap.parse_args()
    checkpoints = args.checkpoints or sorted({args.rounds // 2, args.rounds} - {0})
    if args.report_only:
        results = [
            json.loads((args.out / f"{m}-s{s}-r{args.rounds}.json").read_text())
            for s in args.seeds
            for m in args.methods
            if (args.out / f"{m}-s{s}-r{args.rounds}.json").is_file()
        ]
        print(table(results, checkpoints))
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with task_identity():
        for seed in args.seeds:
            for method in args.methods:
                t0 = time.time()
                res = run(method, seed, args.rounds, args.up, args.down)
                res["seconds"] = round(time.time() - t0, 1)
                name = f"{method}-s{seed}-r{args.rounds}.json"
                (args.out / name).write_text(json.dumps(res))
                print(method, seed, f"{res['accuracy'][-1]:.4f}", res["seconds"], "s", flush=True)
                results.append(res)
    text = table(results, checkpoints)
    (args.out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
