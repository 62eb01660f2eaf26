"""SFPrompt vs FedIT LoRA on SmolLM2-135M-Instruct: exact match per category and bytes per round.

Runs ``apps/sfprompt-llm`` on Flower's Simulation Engine (``flwr_ext.sim.run_app`` +
``fused_run_config``) on the task of the FedIT baseline (``baselines/fedit/run_baseline.py``: its
``overrides`` give the data, template, categories, clients, partitioning, rounds, batch size and
evaluation keys, so both methods see the same data and are evaluated on the same held-out split
by the same code). Each client does ``--steps`` split steps per round, as many gradient steps as
a FedIT client's ``local-steps``; ``--local-loss-steps`` adds SFPrompt's local-loss phase.

The FedIT figures are read from that baseline's federated run of the same seed
(``--fedit-results``, its ``results.json``); ``--run-fedit`` runs it here instead.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python baselines/sfprompt/run_smollm2.py \\
        --variant sfprompt --out baselines/sfprompt/smollm2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "sfprompt-llm"
FEDIT_APP = ROOT / "apps" / "fedit-llm"
sys.path[:0] = [str(APP), str(FEDIT_APP), str(ROOT / "baselines" / "fedit")]

from run_baseline import overrides  # noqa: E402  (the FedIT baseline's task keys)

from flwr_ext.sim import fused_run_config, run_app  # noqa: E402

# SFPrompt variants: tail of one layer with LoRA r=4 on q,v (the app's default) or a richer tail
TAILS: dict[str, dict[str, Any]] = {
    "qv-r4": {},
    "2layers-all-r16": {
        "tail-layers": 2,
        "tail-lora-r": 16,
        "tail-lora-alpha": 32.0,
        "tail-lora-targets": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    },
}


def fedit_args(args: argparse.Namespace) -> argparse.Namespace:
    """``run_baseline.py``'s defaults (its FedIT configuration) with this script's shared sizes."""
    ns = argparse.Namespace(
        model="smollm2",
        template="chat-short",
        categories="extract,convert,uppercase",
        cats=2,
        lr=2e-3,
        min_lr=5e-4,
        schedule="constant",
        r=8,
        targets="q_proj,v_proj",
        max_length=80,
        new_tokens=24,
    )
    for k in ("clients", "rounds", "steps", "batch_size", "train", "eval"):
        setattr(ns, k, getattr(args, k))
    return ns


def sfprompt_config(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    defaults = fused_run_config(APP, {})
    shared = overrides(fedit_args(args), args.seed, out)
    cfg = {k: v for k, v in shared.items() if k in defaults}  # drop the LoRA/FedIT-only keys
    cfg.update(
        {
            "split-steps": args.steps,
            "local-loss-steps": args.local_loss_steps,
            "learning-rate": args.lr,
            "min-learning-rate": args.lr,
            "tail-learning-rate": args.tail_lr,
            "lr-schedule": "constant",
            "num-virtual-tokens": args.prompt_tokens,
            "prune-gamma": args.prune_gamma,
            "min-nodes": args.clients,
            "eval-generate-every": args.rounds,  # round 0 and the last, as the FedIT baseline
            "exchange-timeout": 600.0,
            "start-timeout": 1800.0,
            **TAILS[args.tail],
        }
    )
    return fused_run_config(APP, cfg)


def fedit_row(res: dict[str, Any]) -> dict[str, Any]:
    """Last-round eval and mean bytes per round of a fedit-llm ``results.json``."""
    rounds = res["rounds"][1:]
    up_keys = ("train/uplink-bytes-per-update", "train/bytes-up", "train/bytes-up-uncompressed")
    per_client = [next(r[k] for k in up_keys if k in r) + r["train/bytes-down"] for r in rounds]
    return {
        "eval": res["rounds"][-1],
        "zero-shot": res["rounds"][0],
        "bytes-per-client-round": sum(per_client) / len(per_client),
    }


def table(out: Path) -> str:
    """Markdown: FedIT and every SFPrompt run under ``out`` (EM per category, bytes per round)."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))}
    if not runs:
        return ""
    first = next(iter(runs.values()))
    cats = sorted(k[3:] for k in first["eval"] if k.startswith("em-"))
    lines = [
        "| method | seed | eval loss | EM all | "
        + " | ".join(f"EM {c}" for c in cats)
        + " | bytes/client/round | trained params | client layers | wall s |",
        "|---|---|---|---|" + "---|" * len(cats) + "---|---|---|---|",
    ]

    def row(name: str, seed: Any, m: dict[str, Any], nbytes: float, extra: str) -> str:
        ems = " | ".join(f"{m.get(f'em-{c}', float('nan')):.3f}" for c in cats)
        return (
            f"| {name} | {seed} | {m['eval-loss']:.3f} | {m['em']:.3f} | {ems} | "
            f"{nbytes:,.0f} | {extra} |"
        )

    fedits = {}
    for r in runs.values():
        if "fedit" in r:
            fedits[r["args"]["seed"]] = r["fedit"]
    for seed, f in sorted(fedits.items()):
        lines.append(row("zero-shot", seed, f["zero-shot"], 0, "0 | - | -"))
        lines.append(
            row(
                "FedIT LoRA r=8 q,v",
                seed,
                f["eval"],
                f["bytes-per-client-round"],
                "460,800 | 30/30 | -",
            )
        )
    for name, r in runs.items():
        s = r["sizes"]
        extra = (
            f"{s['trained_params']:,} | {s['client_layers']}/{s['num_layers']} | {r['seconds']:.0f}"
        )
        lines.append(
            row(
                name.rsplit("-seed", 1)[0],
                r["args"]["seed"],
                r["eval"],
                r["bytes-per-client-round"],
                extra,
            )
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--eval", type=int, default=48)
    ap.add_argument("--lr", type=float, default=0.03, help="the soft prompt's learning rate")
    ap.add_argument("--tail-lr", type=float, default=0.0, help="the tail's (0: --lr)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--local-loss-steps", type=int, default=0)
    ap.add_argument("--prune-gamma", type=float, default=1.0)
    ap.add_argument("--tail", choices=sorted(TAILS), default="qv-r4")
    ap.add_argument("--name", default="sfprompt")
    ap.add_argument(
        "--fedit-results", default="", help="default: the FedIT baseline's run of --seed"
    )
    ap.add_argument("--run-fedit", action="store_true")
    ap.add_argument("--work", default="outputs/sfprompt-smollm2")
    ap.add_argument("--out", default=str(ROOT / "baselines" / "sfprompt" / "smollm2"))
    ap.add_argument("--table-only", action="store_true", help="re-render results.md")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.table_only:
        (out / "results.md").write_text(table(out))
        print(table(out))
        return
    work = Path(args.work) / f"{args.name}-seed{args.seed}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = sfprompt_config(args, work)
    from sfprompt_llm.client_app import app as client_app
    from sfprompt_llm.server_app import app as server_app

    t0 = time.perf_counter()
    run_app(server_app, client_app, num_supernodes=args.clients, run_config=cfg)
    res = json.loads((work / "results.json").read_text())
    rounds = res["rounds"][1:]
    row: dict[str, Any] = {
        "args": vars(args),
        "config": cfg,
        "seconds": time.perf_counter() - t0,
        "zero-shot": res["rounds"][0],
        "eval": res["rounds"][-1],
        "rounds": res["rounds"],
        "sizes": res["sizes"],
        "bytes-per-client-round": sum(r["bytes-per-client"] for r in rounds) / len(rounds),
        "bytes-per-round": sum(r["bytes-total"] for r in rounds) / len(rounds),
    }
    if args.run_fedit:
        from fedit_llm.client_app import app as fedit_client
        from fedit_llm.server_app import app as fedit_server

        fed_out = Path(args.work) / f"fedit-seed{args.seed}"
        shutil.rmtree(fed_out, ignore_errors=True)
        fed_cfg = fused_run_config(
            FEDIT_APP,
            {
                **overrides(fedit_args(args), args.seed, fed_out),
                "min-train-nodes": args.clients,
                "eval-generate-every": args.rounds,
            },
        )
        t1 = time.perf_counter()
        run_app(fedit_server, fedit_client, num_supernodes=args.clients, run_config=fed_cfg)
        args.fedit_results = str(fed_out / "results.json")
        row["fedit-seconds"] = time.perf_counter() - t1
    fedit_path = Path(
        args.fedit_results or f"outputs/fedit-baseline/seed{args.seed}/federated/results.json"
    )
    if fedit_path.is_file():
        row["fedit"] = fedit_row(json.loads(fedit_path.read_text()))
        row["fedit-source"] = str(fedit_path)
    (out / f"{args.name}-seed{args.seed}.json").write_text(json.dumps(row, indent=1, default=str))
    print(json.dumps({k: row[k] for k in ("eval", "bytes-per-client-round", "seconds")}))
    (out / "results.md").write_text(table(out))


if __name__ == "__main__":
    main()
