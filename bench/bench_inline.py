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

Backends: ``simulation`` (Flower's Simulation Engine), ``inline`` (ClientApp in this process),
``inline:2`` (inline with 2 warm worker processes, different nodes in parallel). With workers,
"wall / train" can fall below 1 (trainings overlap).

Usage::

    .venv/bin/python bench/bench_inline.py              # 300 updates each
    .venv/bin/python bench/bench_inline.py --updates 90 # quicker
    .venv/bin/python bench/bench_inline.py --backends inline,inline:2  # no Ray
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


def run(spec: str, out: Path, updates: int, seed: int) -> dict:
    """One run of the bench app on ``spec`` (``simulation``, ``inline``, ``inline:<workers>``)."""
    backend, _, workers = spec.partition(":")
    server_app, client_app = load_components(APP_DIR)
    cfg = fused_run_config(
        APP_DIR,
        {"num-server-rounds": max(1, updates // K), "output-dir": str(out), "seed": seed},
    )
    t0 = time.perf_counter()
    run_app(
        server_app,
        client_app,
        num_supernodes=NUM_CLIENTS,
        run_config=cfg,
        backend=backend,
        inline_workers=int(workers or 0),
    )
    total = time.perf_counter() - t0
    if backend == "simulation":
        import ray

        if ray.is_initialized():
            ray.shutdown()
    info = json.loads((out / "fedbuff-bench.json").read_text())
    c = info["counters"]
    received = c["updates-received"]
    return {
        "backend": spec,
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
    ap.add_argument(
        "--backends",
        default="simulation,inline,inline:2",
        help="comma-separated: simulation, inline, inline:<n> (n warm worker processes)",
    )
    # parse_known_args: ``flwr-ext bench`` runs this file with its own argv
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.backends.split(","):
            rows[spec] = run(spec, Path(tmp) / spec, args.updates, args.seed)
            print(json.dumps(rows[spec]), flush=True)
        same = {}
        for spec in rows:
            if spec != "simulation" and "simulation" in rows:
                # train-s (the ClientApp's measured training time) is wall clock, like wall-time
                diffs = compare_runs(
                    Path(tmp) / "simulation", Path(tmp) / spec, "fedbuff", ("train-s",)
                )
                same[spec] = not diffs
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
    for spec, ok in same.items():
        se, il = rows["simulation"], rows[spec]
        print(
            f"{spec}: Simulation Engine / {spec} wall per update "
            f"{se['wall_ms'] / il['wall_ms']:.1f}x (goal >= 3x); {spec} wall / local training "
            f"{il['wall_ms'] / il['train_ms']:.2f}x (goal <= 1.2x); whole runs incl. Ray start "
            f"{se['total_s'] / il['total_s']:.1f}x; records identical to the Simulation Engine's "
            f"(but wall time and random ids): {ok}"
        )
    return 0


if __name__ == "__main__":
    main()
