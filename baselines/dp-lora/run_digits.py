"""Utility vs record-level epsilon on federated digits, run on Flower's Simulation Engine.

FedAvg over ``--clients`` IID partitions of scikit-learn's digits; each ClientApp
(``digits_app.py``, library code only) trains the small ``DigitsCNN`` with
:class:`flwr_ext.privacy.DPLoRAEngine` (``adapter_only=False``: the whole CNN, 9,802
parameters with the defaults, is the trainable part here). The noise multiplier is
calibrated once per client from (epsilon, delta) over all rounds, and the accountant is
restored from ``context.state`` every round. Every configuration is a real
``flwr_ext.sim.run_app`` simulation (Ray).

Accounting: ``--accountant`` (RDP by default, Mironov 2017; PRV, Gopi et al. 2021) via Opacus,
delta 1e-5, add/remove-one-example adjacency. Poisson sampling and noise come from OS entropy.

The DP rows use the DP-SGD recipe (De et al. 2022; Tramer & Boneh 2021; Papernot et al. 2021):
full-batch Poisson sampling (q = 1), few steps, a small tanh CNN; the no-DP row has its own
tuned batch, steps and learning rate (``--nodp-*``) on the same model, data and rounds.
Results are written after every run, so an interrupted sweep keeps its finished runs
(``--resume`` skips (epsilon, seed) pairs already in the JSON).

Usage::

    .venv/bin/python baselines/dp-lora/run_digits.py --epsilons 1 3 8 inf --seeds 0 1 2 \
        --multi-seed-epsilons 8 inf --out baselines/dp-lora
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # Ray workers import `digits_app` through PYTHONPATH (below)
os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from digits_app import client_app, server_app  # noqa: E402

from flwr_ext.sim import run_app  # noqa: E402


def run(eps: float, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """One Flower simulation; returns accuracy and the record-level epsilon spent."""
    nodp = math.isinf(eps)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        run_config = {
            "clients": args.clients,
            "num-server-rounds": args.rounds,
            "steps": args.nodp_steps if nodp else args.steps,
            "batch": args.nodp_batch if nodp else args.batch,
            "lr": args.nodp_lr if nodp else args.lr,
            "width": args.width,
            "hidden": args.hidden,
            "activation": args.activation,
            "seed": seed,
            "output": str(out),
            "dp.target-epsilon": 0.0 if nodp else eps,
            "dp.delta": args.delta,
            "dp.max-grad-norm": args.clip,
            "dp.accountant": args.accountant,
        }
        run_app(server_app, client_app, num_supernodes=args.clients, run_config=run_config)
        row = json.loads(out.read_text())
    return {
        "epsilon_target": eps,
        "seed": seed,
        "accuracy": row["accuracy"],
        "epsilon_spent": row.get("dp-epsilon", math.inf),
        "noise_multiplier": row.get("dp-noise-multiplier", 0.0),
        "steps": row.get("dp-steps", args.rounds * run_config["steps"]),
    }


def summarize(runs: list[dict[str, float]]) -> list[dict[str, float]]:
    """One row per target epsilon: mean and sample std of accuracy over its seeds."""
    rows = []
    for eps in sorted({r["epsilon_target"] for r in runs}):
        group = [r for r in runs if r["epsilon_target"] == eps]
        accs = [r["accuracy"] for r in group]
        rows.append(
            {
                "epsilon_target": eps,
                "seeds": [r["seed"] for r in group],
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "epsilon_spent_max": max(r["epsilon_spent"] for r in group),
                "noise_multiplier": group[0]["noise_multiplier"],
                "steps": group[0]["steps"],
                "seconds_mean": statistics.fmean(r["seconds"] for r in group),
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--multi-seed-epsilons",
        type=float,
        nargs="*",
        default=[8.0, math.inf],
        help="epsilons run with every seed; the others run with the first seed only",
    )
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=4, help="DP-SGD steps per round")
    ap.add_argument("--batch", type=int, default=360, help="expected batch (360 = q 1)")
    ap.add_argument("--lr", type=float, default=20.0)
    ap.add_argument("--clip", type=float, default=0.1)
    ap.add_argument("--nodp-steps", type=int, default=12)
    ap.add_argument("--nodp-batch", type=int, default=64)
    ap.add_argument("--nodp-lr", type=float, default=1.0)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--activation", choices=["relu", "tanh"], default="tanh")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument(
        "--accountant", choices=["rdp", "prv"], default="rdp", help="calibrates and reports"
    )
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results_digits.json"
    runs = json.loads(path.read_text())["runs"] if args.resume and path.exists() else []
    done = {(r["epsilon_target"], r["seed"]) for r in runs}
    for eps in args.epsilons:
        seeds = args.seeds if eps in args.multi_seed_epsilons else args.seeds[:1]
        for seed in seeds:
            if (eps, seed) in done:
                continue
            t = time.time()
            row = run(eps, seed, args)
            row["seconds"] = round(time.time() - t, 1)
            runs.append(row)
            print(json.dumps(row), flush=True)
            summary = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
            summary["rows"] = summarize(runs)
            path.write_text(json.dumps(summary, indent=1))
    _plot(summarize(runs), args.out / "digits_utility_vs_epsilon.png", args.accountant)


def _plot(rows: list[dict[str, float]], path: Path, accountant: str = "rdp") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if not math.isinf(r["epsilon_target"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(
        [r["epsilon_spent_max"] for r in dp_rows],
        [100 * r["accuracy_mean"] for r in dp_rows],
        yerr=[100 * r["accuracy_std"] for r in dp_rows],
        fmt="o-",
        capsize=3,
        label=f"DP-SGD ({accountant.upper()}, delta 1e-5)",
    )
    for r in rows:
        if math.isinf(r["epsilon_target"]):
            ax.axhline(100 * r["accuracy_mean"], color="gray", ls="--", label="no DP")
            ax.axhline(100 * r["accuracy_mean"] - 5, color="gray", ls=":", label="no DP - 5")
    ax.set_xscale("log")
    ax.set_xlabel("record-level epsilon spent over the whole run")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Federated digits (Flower simulation): utility vs epsilon")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
