"""Wall time per client update: the inline backend vs Flower's Simulation Engine, in one run.

Task (issue 21): scikit-learn's digits, 10 clients (IID shards), MLP 64-64-10, 20 Adam steps a
job (batch 32), FedBuff with K = 3, per-client step times from a trace
(``bench/apps/inline-mlp/trace.csv``: 4 ms ... 80 ms a step), a virtual clock. The same packaged
app (``bench/apps/inline-mlp``) runs ``--updates`` client updates on each backend, one after the
other in this process; then the per-update records of the two runs are compared (they must be
identical but for wall time and the random node / message ids).

Figures, per client update (a job that came back):

- ``wall ms/update``: wall time of ``strategy.start`` (Ray's start-up before it not counted) over
  the updates received;
- ``train ms/update``: the training loop alone, measured inside the ClientApp (``train-s``), the
  floor any backend pays;
- ratios: inline wall / train (goal <= 1.2) and Simulation Engine wall / inline wall (goal >= 3).

Usage::

    .venv/bin/python bench/bench_inline.py              # 300 updates each
    .venv/bin/python bench/bench_inline.py --updates 90 # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402

from flwr_ext.inline import compare_runs  # noqa: E402
from flwr_ext.sim import fused_run_config, load_components, run_app  # noqa: E402

APP_DIR = Path(__file__).resolve().parent / "apps" / "inline-mlp"
NUM_CLIENTS = 10
K = 3


def run(backend: str, out: Path, updates: int, seed: int) -> dict:
    """One run of the bench app on ``backend``; its timings."""
    server_app, client_app = load_components(APP_DIR)
    cfg = fused_run_config(
        APP_DIR,
        {"num-server-rounds": max(1, updates // K), "output-dir": str(out), "seed": seed},
    )
    t0 = time.perf_counter()
    run_app(server_app, client_app, num_supernodes=NUM_CLIENTS, run_config=cfg, backend=backend)
    total = time.perf_counter() - t0
    if backend == "simulation":
        import ray

        if ray.is_initialized():
            ray.shutdown()
    info = json.loads((out / "fedbuff-bench.json").read_text())
    c = info["counters"]
    received = c["updates-received"]
    return {
        "backend": backend,
        "updates": int(received),
        "applied": int(c["updates-applied"]),
        "total_s": total,
        "start_s": info["start_wall_s"],
        "wall_ms": 1e3 * info["start_wall_s"] / received,
        "train_ms": 1e3 * info["train_s_applied"] / c["updates-applied"],
        "virtual_s": c["final-time"],
        "accuracy": info["accuracy"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=300, help="client updates per backend")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backends", default="simulation,inline")
    # parse_known_args: ``flwr-ext bench`` runs this file with its own argv
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            rows[backend] = run(backend, Path(tmp) / backend, args.updates, args.seed)
            print(json.dumps(rows[backend]), flush=True)
        same = None
        if {"simulation", "inline"} <= set(rows):
            # train-s (the ClientApp's measured training time) is wall clock, like wall-time
            diffs = compare_runs(
                Path(tmp) / "simulation", Path(tmp) / "inline", "fedbuff", ("train-s",)
            )
            same = not diffs
            for d in diffs[:3]:
                print("difference:", d)
    print(
        f"\ndigits, {NUM_CLIENTS} clients, MLP 64-64-10, 20 Adam steps a job, FedBuff K={K}, "
        f"trace step times, {args.updates} updates a backend, {os.cpu_count()} CPUs"
    )
    print(
        f"{'backend':<12}{'wall ms/update':>16}{'train ms/update':>17}{'wall/train':>12}"
        f"{'run wall s':>12}{'accuracy':>10}"
    )
    for r in rows.values():
        print(
            f"{r['backend']:<12}{r['wall_ms']:>16.1f}{r['train_ms']:>17.2f}"
            f"{r['wall_ms'] / r['train_ms']:>12.2f}{r['total_s']:>12.1f}{r['accuracy']:>10.3f}"
        )
    if same is not None:
        se, il = rows["simulation"], rows["inline"]
        print(
            f"Simulation Engine / inline wall per update: {se['wall_ms'] / il['wall_ms']:.1f}x "
            f"(goal >= 3x); inline wall / local training: {il['wall_ms'] / il['train_ms']:.2f}x "
            f"(goal <= 1.2x); whole runs incl. Ray start: {se['total_s'] / il['total_s']:.1f}x"
        )
        print(f"per-update records identical (but wall time and random ids): {same}")
    return 0


if __name__ == "__main__":
    main()
