"""FedIT claim through the packaged app: federated adapter vs local-only adapters (slow: CPU).

Zhang et al. 2023, "Towards Building the Federated GPT: Federated Instruction Tuning": clients
that each hold a few instruction categories (Shepherd's split) gain from FedAvg of their LoRA
adapters over training alone. Every number here comes from real Flower Simulation Engine runs of
``apps/fedit-llm`` (``flwr_ext.sim.run_app`` + ``fused_run_config``):

- federated: ``--clients`` SuperNodes, ``--rounds`` FedAvg rounds of ``--steps`` local steps;
- local-only: for each client ``i``, a one-SuperNode run of the same app on data partition ``i``
  (``data-partitions = K``, ``data-partition-ids = "i"``): the same rounds, steps, learning-rate
  schedule, optimizer restarts and seeds per round, only without averaging;
- all adapters are evaluated by the app's server on the same held-out mixed-category split
  (response loss, greedy exact match per category). Round 0 of the federated run is zero-shot.

Clients get categories with flwr-datasets' PathologicalPartitioner (``first-deterministic``:
client ``i`` holds categories ``i .. i+c-1`` of the sorted list, cyclically), so with
``--clients`` equal to the number of categories every category is held by ``c`` clients.

    HF_HUB_OFFLINE=1 .venv/bin/python baselines/fedit/run_baseline.py --seeds 0 1 \\
        --out baselines/fedit/results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "fedit-llm"


def overrides(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    """Run-config keys shared by the federated and the local-only runs of one seed."""
    return {
        "model": args.model,
        "dataset": "synthetic",
        "categories": args.categories,
        "num-train-examples": args.train,
        "num-eval-examples": args.eval,
        "template": args.template,
        "max-length": args.max_length,
        "partitioner": "category",
        "categories-per-partition": args.cats,
        "lora-r": args.r,
        "lora-alpha": 2.0 * args.r,
        "lora-targets": args.targets,
        "num-server-rounds": args.rounds,
        "local-steps": args.steps,
        "batch-size": args.batch_size,
        "learning-rate": args.lr,
        "min-learning-rate": args.min_lr,
        "lr-schedule": args.schedule,
        "eval-max-new-tokens": args.new_tokens,
        "eval-batch-size": 16,
        "eval-num-samples": 8,
        "checkpoint-every": 0,
        "progress": False,
        "torch-threads": 1,
        "seed": seed,
        "model-seed": seed,
        "output-dir": str(out),
    }


def run(cfg: dict[str, Any], num_supernodes: int) -> dict[str, Any]:
    """One Simulation Engine run of the app; returns its ``results.json``."""
    from fedit_llm.client_app import app as client_app
    from fedit_llm.server_app import app as server_app

    from flwr_ext.sim import run_app

    out = Path(cfg["output-dir"])
    shutil.rmtree(out, ignore_errors=True)
    run_app(server_app, client_app, num_supernodes=num_supernodes, run_config=cfg)
    return json.loads((out / "results.json").read_text())


def client_categories(cfg: dict[str, Any], k: int) -> list[dict[str, int]]:
    """Training examples per category of each client (the split the partitioner made)."""
    from collections import Counter

    from flwr_ext.llm.tasks import client_records

    counts = [Counter(r["category"] for r in client_records(cfg, i, k)) for i in range(k)]
    return [dict(sorted(c.items())) for c in counts]


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Federated run, then one local-only run per client, for one seed."""
    from flwr_ext.sim import fused_run_config

    k = args.clients
    base = Path(args.work) / f"seed{seed}"
    t0 = time.perf_counter()
    fed_cfg = fused_run_config(
        APP,
        {
            **overrides(args, seed, base / "federated"),
            "min-train-nodes": k,
            "eval-generate-every": args.rounds,  # zero-shot (round 0) and the last round
        },
    )
    fed = run(fed_cfg, k)
    out: dict[str, Any] = {
        "seed": seed,
        "clients": client_categories(fed_cfg, k),
        "zero-shot": fed["rounds"][0],
        "federated": fed["rounds"][-1],
        "federated-rounds": fed["rounds"],
        "federated-seconds": time.perf_counter() - t0,
        "local": [],
    }
    print(json.dumps({"seed": seed, "federated": out["federated"]}), flush=True)
    for i in range(k):
        t1 = time.perf_counter()
        cfg = fused_run_config(
            APP,
            {
                **overrides(args, seed, base / f"local{i}"),
                "min-train-nodes": 1,
                "data-partitions": k,
                "data-partition-ids": str(i),
                "eval-generate-every": 0,  # last round only
            },
        )
        res = run(cfg, 1)
        row = dict(res["rounds"][-1])
        row["seconds"] = time.perf_counter() - t1
        out["local"].append(row)
        print(json.dumps({"seed": seed, f"local{i}": row}), flush=True)
    return out


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def table(payload: dict[str, Any]) -> str:
    """Markdown table: EM per category and loss, mean over seeds (and per seed)."""
    runs = payload["runs"]
    cats = sorted(k[3:] for k in runs[0]["federated"] if k.startswith("em-"))
    head = "| adapter | seed | eval loss | EM all | " + " | ".join(cats) + " |"
    lines = [head, "|" + "---|" * (4 + len(cats))]

    def row(name: str, seed: str, m: dict[str, Any]) -> str:
        ems = " | ".join(f"{m.get(f'em-{c}', float('nan')):.2f}" for c in cats)
        return f"| {name} | {seed} | {m['eval-loss']:.3f} | {m['em']:.3f} | {ems} |"

    def avg(ms: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ["eval-loss", "em"] + [f"em-{c}" for c in cats]
        return {key: mean([m[key] for m in ms if key in m]) for key in keys}

    for r in runs:
        lines.append(row("zero-shot", str(r["seed"]), r["zero-shot"]))
        lines.append(row("federated (FedIT)", str(r["seed"]), r["federated"]))
        for i, m in enumerate(r["local"]):
            held = ",".join(r["clients"][i])
            lines.append(row(f"local-only client {i} ({held})", str(r["seed"]), m))
        lines.append(row("local-only mean", str(r["seed"]), avg(r["local"])))
    if len(runs) > 1:
        lines.append(row("**federated, mean**", "all", avg([r["federated"] for r in runs])))
        local = [m for r in runs for m in r["local"]]
        lines.append(row("**local-only mean, mean**", "all", avg(local)))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--template", default="chat-short")
    ap.add_argument("--categories", default="extract,convert,uppercase")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--cats", type=int, default=2, help="categories per client")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr", type=float, default=5e-4)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=80)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--work", default="outputs/fedit-baseline")
    ap.add_argument("--out", default="baselines/fedit/results.json")
    ap.add_argument(
        "--resume", action="store_true", help="keep the seeds already in --out, run the others"
    )
    args = ap.parse_args()
    t0 = time.perf_counter()
    runs, before = [], 0.0
    if args.resume and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        runs, before = [r for r in old["runs"] if r["seed"] in args.seeds], old["seconds"]
    done = {r["seed"] for r in runs}
    payload = {"args": vars(args), "seconds": before, "runs": runs}
    for seed in args.seeds:
        if seed in done:
            continue
        runs.append(run_seed(args, seed))
        payload = {"args": vars(args), "seconds": before + time.perf_counter() - t0, "runs": runs}
        Path(args.out).write_text(json.dumps(payload, indent=2, default=str))  # after each seed
    print(table(payload))
    print(f"total {payload['seconds']:.0f} s")


if __name__ == "__main__":
    main()
