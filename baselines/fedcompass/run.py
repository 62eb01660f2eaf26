"""FedCompass reproduction on digits: FedAvg (timed) vs FedAsync vs FedBuff vs FedCompass.

Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power-Aware Scheduler", ICLR 2024 (arXiv:2309.14675), Sec. 5:
clients with homogeneous, normal and exponential computing speeds; the paper's claims are that
FedCompass reaches a target accuracy fastest and keeps FedAvg-level accuracy, while FedAsync
and FedBuff lose accuracy under strong heterogeneity. A fourth, strongly skewed profile (a
trace file, per-step compute time fastest:slowest = 1600x) adds the regime where DESIGN.md
says FedAsync / FedBuff stall on non-IID data.

Every seed is ONE run of ``apps/async-vision`` through :func:`flwr_ext.sim.run_app`, on the
inline backend by default (``--backend inline``: virtual clock, same results as Flower's
Simulation Engine bit for bit, no Ray, ClientApps in ``--workers`` (2) warm worker processes;
``--backend simulation`` runs the Simulation Engine); the
ServerApp runs the four strategies one after the
other on the same SuperNodes, each from the same initial model with a fresh virtual clock and
the same virtual-time budget (the demo machinery of :mod:`flwr_ext.demo`, reused). The per-run
files go to ``<out>/runs/<profile>-s<seed>/``; the table (``results.md``), ``results.json`` and
``accuracy_vs_time.png`` are aggregated over seeds.

Usage::

    .venv/bin/python baselines/fedcompass/run.py            # full: 4 profiles x 3 seeds
    .venv/bin/python baselines/fedcompass/run.py --quick    # smoke: 1 seed, short budgets
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from flwr_ext import sweep  # noqa: E402
from flwr_ext.demo import APP_DIR, LABELS, strategies_available, summarize  # noqa: E402
from flwr_ext.sim import fused_run_config, run_app  # noqa: E402
from flwr_ext.sweep import cells_server_app, mean_sd, plot_curves  # noqa: E402

HERE = Path(__file__).resolve().parent
SKEWED_TRACE = HERE / "skewed_trace.csv"
NUM_CLIENTS = 8
TARGET = 0.80

#: Shared run-config overrides (apps/async-vision keys; see its README).
COMMON: dict[str, Any] = {
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "clock": "virtual",
    "local-steps": 10,
    "batch-size": 16,
    "learning-rate": 0.05,
    "min-train-nodes": NUM_CLIENTS,
    "num-server-rounds": 100_000,  # the virtual-time budget (max-time) ends each run
    "alpha": 0.6,
    "buffer-size": 3,
    "server-lr": 1.0,
    "staleness": "polynomial",
    "staleness-a": 0.5,
    "compass-q-min": 5,
    "compass-q-max": 20,
    "compass-lambda": 1.5,
    "profile-jitter": 0.1,
    "latency": 0.05,
}

#: Per-profile keys. ``max-time`` is the virtual-time budget, the same for every strategy:
#: 5-11 FedAvg rounds (a round lasts as long as the slowest client's job).
PROFILES: dict[str, dict[str, Any]] = {
    "homogeneous": {"profile": "homogeneous", "profile-mean-step-time": 0.1, "max-time": 14.0},
    "normal": {
        "profile": "normal",
        "profile-mean-step-time": 0.1,
        "profile-std": 0.03,
        "max-time": 18.0,
    },
    "exponential": {"profile": "exponential", "profile-mean-step-time": 0.1, "max-time": 40.0},
    "skewed": {
        "profile": "trace",
        "profile-trace": str(SKEWED_TRACE),
        "profile-min-step-time": 1e-4,
        "profile-jitter": 0.0,
        "max-time": 45.0,
    },
}


def profile_overrides(profile: str, quick: bool) -> dict[str, Any]:
    """Server-side run-config keys of one profile (device profile and time budget)."""
    cfg = {**PROFILES[profile]}
    if quick:
        cfg["max-time"] = cfg["max-time"] / 4
    cfg["eval-period"] = cfg["max-time"] / 30
    return cfg


def run_one(
    profiles: list[str],
    seed: int,
    runs_dir: Path,
    quick: bool,
    backend: str = "inline",
    workers: int = 0,
) -> float:
    """One real Flower simulation (seed ``seed``): every profile, the four strategies each."""
    from async_vision.client_app import app as client_app
    from async_vision.server_app import main as app_main

    names = strategies_available()
    overrides = {**COMMON, "seed": seed, "strategy": ",".join(names)}
    if quick:
        overrides["num-server-rounds"] = 30
    cfg = fused_run_config(APP_DIR, overrides)
    t0 = time.time()
    cells = {p: profile_overrides(p, quick) for p in profiles}
    server_app = cells_server_app(cells, seed, runs_dir, app_main=app_main)
    run_app(
        server_app,
        client_app,
        num_supernodes=NUM_CLIENTS,
        run_config=cfg,
        backend=backend,
        inline_workers=workers,
    )
    return time.time() - t0


def run_isolated(
    profiles: list[str],
    seed: int,
    runs_dir: Path,
    quick: bool,
    timeout: float,
    backend: str,
    workers: int,
) -> float:
    """:func:`run_one` in a child process (:func:`flwr_ext.sweep.run_isolated`), retried once."""

    def command(todo: list[str]) -> list[str]:
        cmd = [sys.executable, __file__, "--one", ",".join(todo), str(seed)]
        cmd += ["--out", str(runs_dir.parent), "--backend", backend, "--workers", str(workers)]
        return cmd + (["--quick"] if quick else [])

    return sweep.run_isolated(command, profiles, seed, runs_dir, timeout)


_fmt = mean_sd


def aggregate(runs_dir: Path, profiles: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per (profile, strategy): the summaries of every seed that finished."""
    return sweep.aggregate(
        runs_dir,
        profiles,
        seeds,
        strategies_available(),
        lambda d, name: summarize(d, name, TARGET),
    )


def table(agg: dict[str, Any]) -> str:
    """Markdown table: time to target, final / best accuracy, staleness, updates."""
    lines = [
        f"| profile | strategy | seeds reaching {TARGET:.0%} | time to {TARGET:.0%} "
        "(virtual s, mean ± sd over seeds that reached it) | final acc. | best acc. "
        "| mean staleness | updates applied | server updates | end (virtual s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for profile, per in agg.items():
        for name, rows in per.items():
            if not rows:
                continue
            ttt = [r["time_to_target"] for r in rows if r["time_to_target"] is not None]
            lines.append(
                "| "
                + " | ".join(
                    [
                        profile,
                        LABELS.get(name, name),
                        f"{len(ttt)}/{len(rows)}",
                        _fmt(ttt, 1),
                        _fmt([r["final_accuracy"] for r in rows]),
                        _fmt([r["best_accuracy"] for r in rows]),
                        _fmt([r["mean_staleness"] for r in rows], 2),
                        _fmt([r["updates_applied"] for r in rows], 0),
                        _fmt([r["server_versions"] for r in rows], 0),
                        _fmt([r["final_time"] for r in rows], 1),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def plot(agg: dict[str, Any], path: Path) -> Path:
    """Mean accuracy over seeds against virtual time, one panel per profile (PNG)."""
    return plot_curves(agg, path, (TARGET,), LABELS)


def _no_curve(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k != "curve"}


def main(argv: list[str] | None = None) -> int:
    """Run the missing simulations, then write ``results.md``, ``results.json`` and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help="1/4 of the time budgets")
    ap.add_argument("--rerun", action="store_true", help="ignore finished runs")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1500.0, help="per simulation (s)")
    ap.add_argument(
        "--backend",
        choices=["inline", "simulation"],
        default="inline",
        help="inline (default; virtual clock, Simulation Engine results) or simulation (Ray)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=2,
        help="inline: warm worker processes running ClientApps in parallel (0: in-process)",
    )
    ap.add_argument("--one", nargs=2, metavar=("PROFILE", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        run_one(
            args.one[0].split(","),
            int(args.one[1]),
            args.out / "runs",
            args.quick,
            args.backend,
            args.workers,
        )
        return 0
    profiles = [p for p in args.profiles.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs_dir = args.out / "runs"
    t0 = time.time()
    if not args.aggregate_only:
        for seed in seeds:
            todo = profiles
            if not args.rerun:
                todo = [p for p in profiles if not (runs_dir / f"{p}-s{seed}/done.json").exists()]
            if todo:
                wall = run_isolated(
                    todo, seed, runs_dir, args.quick, args.timeout, args.backend, args.workers
                )
                elapsed = time.time() - t0
                print(
                    f"[{elapsed:7.1f} s] seed {seed} ({','.join(todo)}): {wall:.1f} s", flush=True
                )
    agg = aggregate(runs_dir, profiles, seeds)
    md = table(agg)
    (args.out / "results.md").write_text(md + "\n")
    slim = {
        p: {n: [_no_curve(r) for r in rows] for n, rows in per.items()} for p, per in agg.items()
    }
    (args.out / "results.json").write_text(
        json.dumps({"target": TARGET, "num_clients": NUM_CLIENTS, "results": slim}, indent=1)
    )
    plot(agg, args.out / "accuracy_vs_time.png")
    print(md)
    print(f"total wall: {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
