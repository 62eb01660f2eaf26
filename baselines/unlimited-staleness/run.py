"""Unlimited staleness (Wang, Gao et al.): time to accuracy of five ways to use stale updates.

Wang, Gao et al., "Tackling the Unlimited Staleness in Federated Learning with Intertwined Data
and Device Heterogeneities" claim that converting stale updates into fresh ones (gradient
inversion, :mod:`flwr_ext.staleness_conversion`) gives up to 20 % higher accuracy and up to 35 %
faster training than weighting them down. Setting: digits, ``DigitsCNN``, the intertwined
partition and device profile of ``apps/async-vision`` (nodes 0..S-1 are ``slow-factor`` times
slower and alone hold labels 8 and 9), FedBuff. Treatments, in the same run (same SuperNodes,
same initial model, fresh virtual clock each):

* ``raw``: the stale update as it is (constant staleness weight),
* ``polynomial``: ``(1 + tau)^-1/2``,
* ``exp2``: the reference's ``2^(-tau/20)`` (``staleness = "exponential"``),
* ``dc-asgd``: DC-ASGD delay compensation (``dc-asgd-lambda``, constant weight),
* ``conversion``: :class:`~flwr_ext.strategies.stale_conversion.StaleConversion` (constant
  weight; its measured CPU time is charged to the virtual clock).

Every seed is ONE run of ``apps/async-vision`` through :func:`flwr_ext.sim.run_app` (inline
backend: virtual clock, Simulation Engine results, no Ray); its ServerApp runs the app's own
``main`` once per treatment with the treatment's keys (as ``baselines/fedcompass/run.py`` does
per profile, through :mod:`flwr_ext.sweep`). Per-run files go to
``runs/intertwined-s<seed>/<treatment>/``; ``time_to_accuracy.md``,
``results.json`` and ``accuracy_vs_time.png`` are aggregated over seeds (the table goes to
``time_to_accuracy.md``; ``results.md`` is the update-level comparison of
``measure_conversion.py``).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python baselines/unlimited-staleness/run.py             # 3 seeds
    OMP_NUM_THREADS=1 .venv/bin/python baselines/unlimited-staleness/run.py --aggregate-only
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from flwr_ext import sweep  # noqa: E402
from flwr_ext.results import load_result  # noqa: E402
from flwr_ext.sim import fused_run_config, run_app  # noqa: E402
from flwr_ext.sweep import cells_server_app, mean_curve, mean_sd  # noqa: E402

HERE = Path(__file__).resolve().parent
APP_DIR = HERE.parents[1] / "apps" / "async-vision"
NUM_CLIENTS = 6
STRATEGY = "fedbuff"
#: Overall accuracies and slow-class accuracies whose first crossing is reported.
TARGETS = (0.7, 0.8, 0.9)
SLOW_TARGETS = (0.5, 0.8)

#: Shared run-config keys (apps/async-vision; see its README).
COMMON: dict[str, Any] = {
    "strategy": STRATEGY,
    "partitioner": "intertwined",
    "profile": "intertwined",
    "intertwined-slow-nodes": 2,
    "intertwined-slow-classes": 2,
    "intertwined-slow-factor": 14.0,  # slow jobs ~7 s, fast ~0.66 s: staleness 40-50
    "clock": "virtual",
    "profile-mean-step-time": 0.1,
    "profile-jitter": 0.1,
    "latency": 0.05,
    "local-steps": 5,
    "batch-size": 16,
    "learning-rate": 0.05,
    "momentum": 0.0,  # plain SGD, the recipe the conversion replays
    "min-train-nodes": NUM_CLIENTS,
    "num-server-rounds": 100_000,  # the virtual-time budget (max-time) ends each run
    "max-time": 150.0,
    "eval-period": 2.0,
    "buffer-size": 1,
    "server-lr": 1.0,
}

#: Treatment -> its own keys.
TREATMENTS: dict[str, dict[str, Any]] = {
    "raw": {"staleness": "constant"},
    "polynomial": {"staleness": "polynomial", "staleness-a": 0.5},
    "exp2": {"staleness": "exponential", "staleness-a": 20.0},
    "dc-asgd": {"staleness": "constant", "dc-asgd-lambda": 4.0},
    "conversion": {
        "staleness": "constant",
        "stale-conversion": True,
        "stale-conversion-threshold": 20,
        "stale-conversion-samples": 32,
        "stale-conversion-iterations": 60,
        "stale-conversion-max-residual": 0.5,
    },
}
LABELS = {
    "raw": "raw stale (constant)",
    "polynomial": "polynomial (1+tau)^-1/2",
    "exp2": "2^(-tau/20)",
    "dc-asgd": "DC-ASGD (lambda 4)",
    "conversion": "conversion",
}


CELL = "intertwined"  # the one setting; the treatments are its variants


def run_seed(seed: int, runs_dir: Path, workers: int) -> float:
    """One inline Flower run (seed ``seed``): every treatment, one after the other."""
    from async_vision.client_app import app as client_app
    from async_vision.server_app import main as app_main

    cfg = fused_run_config(APP_DIR, {**COMMON, "seed": seed})
    t0 = time.time()
    server_app = cells_server_app({CELL: {}}, seed, runs_dir, TREATMENTS, app_main=app_main)
    run_app(
        server_app,
        client_app,
        num_supernodes=NUM_CLIENTS,
        run_config=cfg,
        backend="inline",
        inline_workers=workers,
    )
    return time.time() - t0


def run_isolated(seed: int, runs_dir: Path, workers: int, timeout: float) -> float:
    """:func:`run_seed` in a child process (:func:`flwr_ext.sweep.run_isolated`), retried once."""

    def command(_: list[str]) -> list[str]:
        cmd = [sys.executable, __file__, "--one", str(seed), "--out", str(runs_dir.parent)]
        return cmd + ["--workers", str(workers), "--max-time", str(COMMON["max-time"])]

    return sweep.run_isolated(command, [CELL], seed, runs_dir, timeout)


# ---------------------------------------------------------------------- summaries
def _first(points: list[tuple[float, int, float]], target: float) -> tuple[float, int] | None:
    for t, version, acc in points:
        if acc >= target:
            return t, version
    return None


def summarize(cell: Path, name: str) -> dict[str, Any]:
    """Final accuracies, first crossings of the targets, conversions of one treatment's run."""
    out = cell / name
    res = load_result(out / f"{STRATEGY}.json")
    evals = res["evaluate_metrics_serverapp"]
    rows = sorted(
        (float(m["time"]), int(v), float(m["accuracy"]), float(m["accuracy-slow-classes"]))
        for v, m in evals.items()
    )
    overall = [(t, v, a) for t, v, a, _ in rows]
    slow = [(t, v, s) for t, v, _, s in rows]
    tail = rows[-max(len(rows) // 5, 1) :]  # last 20 % of the evaluations
    counters = json.loads((out / f"{STRATEGY}-counters.json").read_text())["counters"]
    with (out / f"{STRATEGY}-updates.csv").open() as fh:
        updates = list(csv.DictReader(fh))
    stale = [
        int(float(u["staleness"]))
        for u in updates
        if u.get("staleness") not in (None, "") and u.get("accepted", "True") in ("True", "1")
    ]
    conv_path = out / f"{STRATEGY}-conversions.csv"
    conv = list(csv.DictReader(conv_path.read_text().splitlines())) if conv_path.exists() else []
    return {
        "final_accuracy": rows[-1][2],
        "final_slow_accuracy": rows[-1][3],
        "tail_accuracy": float(np.mean([r[2] for r in tail])),
        "tail_slow_accuracy": float(np.mean([r[3] for r in tail])),
        "reach": {f"{x:.2f}": _first(overall, x) for x in TARGETS},
        "reach_slow": {f"{x:.2f}": _first(slow, x) for x in SLOW_TARGETS},
        "max_staleness": max(stale, default=0),
        "mean_staleness": counters.get("mean-staleness"),
        "versions": int(counters["versions"]),
        "updates_applied": int(counters["updates-applied"]),
        "conversions_accepted": sum(float(c["accepted"]) > 0 for c in conv),
        "conversions_rejected": sum(float(c["accepted"]) == 0 for c in conv),
        "conversion_cpu_s": float(sum(float(c["seconds"]) for c in conv)),
        "conversion_residual_mean": float(np.mean([float(c["residual"]) for c in conv]))
        if conv
        else None,
        "wall_s": float(counters["wall-time"]),
        "curve": [[t, v, a, s] for t, v, a, s in rows],
    }


def aggregate(runs_dir: Path, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Per treatment: the summaries of every seed that finished."""
    return sweep.aggregate(runs_dir, [CELL], seeds, list(TREATMENTS), summarize)[CELL]


def _fmt(values: list[float], digits: int = 3) -> str:
    return mean_sd([v for v in values if v is not None], digits)


def _reach(rows: list[dict[str, Any]], key: str, target: str, idx: int, digits: int) -> str:
    hits = [r[key][target][idx] for r in rows if r[key][target] is not None]
    return f"{_fmt(hits, digits)} ({len(hits)}/{len(rows)})"


def table(agg: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown tables: accuracy, time and versions to targets, conversions."""
    head = [
        "treatment",
        "final acc.",
        "final acc. slow classes",
        "last-20 % mean acc.",
        "last-20 % mean slow acc.",
        *[f"time to {x:.0%} (s)" for x in TARGETS],
        *[f"versions to {x:.0%}" for x in TARGETS],
        *[f"time to {x:.0%} slow (s)" for x in SLOW_TARGETS],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rows in agg.items():
        if not rows:
            continue
        cells = [
            LABELS[name],
            _fmt([r["final_accuracy"] for r in rows]),
            _fmt([r["final_slow_accuracy"] for r in rows]),
            _fmt([r["tail_accuracy"] for r in rows]),
            _fmt([r["tail_slow_accuracy"] for r in rows]),
            *[_reach(rows, "reach", f"{x:.2f}", 0, 1) for x in TARGETS],
            *[_reach(rows, "reach", f"{x:.2f}", 1, 0) for x in TARGETS],
            *[_reach(rows, "reach_slow", f"{x:.2f}", 0, 1) for x in SLOW_TARGETS],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    head2 = [
        "treatment",
        "max staleness",
        "mean staleness",
        "versions",
        "updates applied",
        "conversions accepted",
        "conversions rejected",
        "server CPU converting (s)",
        "wall (s)",
    ]
    lines += ["", "| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for name, rows in agg.items():
        if not rows:
            continue
        cells = [
            LABELS[name],
            _fmt([r["max_staleness"] for r in rows], 0),
            _fmt([r["mean_staleness"] for r in rows], 2),
            _fmt([r["versions"] for r in rows], 0),
            _fmt([r["updates_applied"] for r in rows], 0),
            _fmt([r["conversions_accepted"] for r in rows], 1),
            _fmt([r["conversions_rejected"] for r in rows], 1),
            _fmt([r["conversion_cpu_s"] for r in rows], 2),
            _fmt([r["wall_s"] for r in rows], 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(agg: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Mean accuracy (overall, slow classes) over seeds against virtual time (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, rows in agg.items():
        if not rows:
            continue
        t_end = max(r["curve"][-1][0] for r in rows)
        grid = np.linspace(0.0, t_end, 200)
        for ax, col in zip(axes, (2, 3), strict=True):
            curves = [[(p[0], p[col]) for p in r["curve"]] for r in rows]
            ax.plot(grid, mean_curve(curves, grid), label=LABELS[name], lw=1.4)
    n = max(len(rows) for rows in agg.values())
    for ax, title in zip(axes, ("all classes", "slow clients' classes (8, 9)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test accuracy (mean of {n} seeds)")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the missing seeds, then write ``time_to_accuracy.md``, ``results.json``, the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rerun", action="store_true", help="ignore finished runs")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="inline worker processes")
    ap.add_argument("--max-time", type=float, default=0.0, help="override the time budget")
    ap.add_argument("--timeout", type=float, default=1200.0, help="per seed (s)")
    ap.add_argument("--one", type=int, metavar="SEED", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_time > 0:
        COMMON["max-time"] = args.max_time
    runs_dir = args.out / "runs"
    if args.one is not None:
        run_seed(args.one, runs_dir, args.workers)
        return 0
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t0 = time.time()
    if not args.aggregate_only:
        for seed in seeds:
            if args.rerun or not sweep.is_done(runs_dir, CELL, seed):
                wall = run_isolated(seed, runs_dir, args.workers, args.timeout)
                print(f"[{time.time() - t0:7.1f} s] seed {seed}: {wall:.1f} s", flush=True)
    all_seeds = sorted(int(p.name.rsplit("-s", 1)[1]) for p in runs_dir.glob(f"{CELL}-s*"))
    agg = aggregate(runs_dir, all_seeds)
    md = table(agg)
    (args.out / "time_to_accuracy.md").write_text(md + "\n")
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "num_clients": NUM_CLIENTS,
                "common": COMMON,
                "treatments": TREATMENTS,
                "targets": TARGETS,
                "slow_targets": SLOW_TARGETS,
                "results": agg,  # curve: [virtual time, version, accuracy, slow-class acc.]
            },
            indent=1,
        )
    )
    plot(agg, args.out / "accuracy_vs_time.png")
    print(md)
    print(f"total wall: {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
