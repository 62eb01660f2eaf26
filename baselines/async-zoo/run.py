"""Every asynchronous strategy of flwr-ext on digits, under four device profiles (issue 17).

FedAvg (timed), FedAsync, FedBuff, FedCompass, FedFix and FedBuff + Adaptive Braking (the
``adaptive-braking`` server optimizer), all from :mod:`flwr_ext.strategies` through the run-config
keys of ``apps/async-vision``, on the same 8 SuperNodes, from the same initial model, each with a
fresh virtual clock and the same virtual-time budget. Profiles: ``homogeneous``,
``exponential``, ``skewed`` (the FedCompass baseline's trace: per-step times 0.0005-0.8 s) on a
Dirichlet(0.5) split, and ``intertwined`` (nodes 0 and 1 are 10x slower and alone hold the
labels 8 and 9). FAVANO is not in the zoo: its Algorithm 1 could not be found (docs/asyncfl.md).

This file is wiring only: the sweep machinery is :mod:`flwr_ext.sweep` (shared with
``baselines/fedcompass/run.py``), the algorithms are in :mod:`flwr_ext.strategies`. Per seed, one
simulation on the inline backend runs the three Dirichlet profiles, another the intertwined one
(its data split differs, and the ClientApp reads the split from the run config).

Usage::

    .venv/bin/python baselines/async-zoo/run.py            # full: 4 profiles x 3 seeds
    .venv/bin/python baselines/async-zoo/run.py --quick    # smoke: 1/5 budgets, in quick/
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from flwr_ext import sweep  # noqa: E402
from flwr_ext.demo import APP_DIR, summarize  # noqa: E402
from flwr_ext.results import load_result  # noqa: E402
from flwr_ext.sim import fused_run_config, run_app  # noqa: E402
from flwr_ext.sweep import mean_sd  # noqa: E402

HERE = Path(__file__).resolve().parent
SKEWED_TRACE = HERE.parent / "fedcompass" / "skewed_trace.csv"
NUM_CLIENTS = 8
TARGETS = (0.80, 0.90)
#: Metric of the ServerApp's evaluation under the intertwined split: accuracy on the test
#: examples of the labels only the slow nodes hold.
SLOW_METRIC = "accuracy-slow-classes"

#: Run-config keys shared by every cell (apps/async-vision keys; see its README).
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
    "fedfix-dt": 1.0,
    "server-opt-beta": 0.9,
    "server-opt-rho": 2.0,
    "intertwined-slow-nodes": 2,
    "intertwined-slow-classes": 2,
    "intertwined-slow-factor": 10.0,
    "profile-jitter": 0.1,
    "latency": 0.05,
}

#: Strategy variants: file name -> run-config keys. ``server-lr`` of FedFix and of the
#: Adaptive Braking optimizer: see the README (FedFix's tick weights sum to more than 1;
#: AB's momentum 0.9 multiplies the step by about 10).
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg-timed": {"strategy": "fedavg-timed"},
    "fedasync": {"strategy": "fedasync"},
    "fedbuff": {"strategy": "fedbuff"},
    "fedcompass": {"strategy": "fedcompass"},
    "fedfix": {"strategy": "fedfix", "server-lr": 0.7},
    "fedbuff-ab": {
        "strategy": "fedbuff",
        "server-opt": "adaptive-braking",
        "server-lr": 0.3,
        "server-opt-rho": 1.0,
    },
}

LABELS = {
    "fedavg-timed": "FedAvg (timed)",
    "fedasync": "FedAsync",
    "fedbuff": "FedBuff",
    "fedcompass": "FedCompass",
    "fedfix": "FedFix",
    "fedbuff-ab": "FedBuff + AB",
}

#: Per-profile server keys; ``max-time`` is the virtual-time budget of every strategy.
PROFILES: dict[str, dict[str, Any]] = {
    "homogeneous": {"profile": "homogeneous", "profile-mean-step-time": 0.1, "max-time": 20.0},
    "exponential": {"profile": "exponential", "profile-mean-step-time": 0.1, "max-time": 40.0},
    "skewed": {
        "profile": "trace",
        "profile-trace": str(SKEWED_TRACE),
        "profile-min-step-time": 1e-4,
        "profile-jitter": 0.0,
        "max-time": 80.0,
    },
    "intertwined": {"profile": "intertwined", "profile-mean-step-time": 0.1, "max-time": 100.0},
}

#: Client-side (data) keys per profile; profiles with the same keys share a simulation.
DATA: dict[str, dict[str, Any]] = {"intertwined": {"partitioner": "intertwined"}}

#: Budgets of ``--quick`` are this fraction of the full ones.
QUICK_FRACTION = 0.2


def profile_overrides(profile: str, quick: bool, max_time: float = 0.0) -> dict[str, Any]:
    """Server-side run-config keys of one profile (device profile, budget, evaluation grid).

    ``max_time > 0`` replaces the profile's budget (before ``quick`` scales it).
    """
    cfg = {**PROFILES[profile]}
    if max_time > 0:
        cfg["max-time"] = float(max_time)
    if quick:
        cfg["max-time"] = cfg["max-time"] * QUICK_FRACTION
    cfg["eval-period"] = cfg["max-time"] / 50
    return cfg


def groups(profiles: list[str]) -> list[list[str]]:
    """The profiles split into simulations of identical client-side keys (in order)."""
    out: dict[str, list[str]] = {}
    for p in profiles:
        out.setdefault(json.dumps(DATA.get(p, {}), sort_keys=True), []).append(p)
    return list(out.values())


def run_one(
    profiles: list[str],
    seed: int,
    runs_dir: Path,
    quick: bool,
    backend: str = "inline",
    workers: int = 2,
    variants: list[str] | None = None,
    max_time: float = 0.0,
) -> float:
    """One simulation (seed ``seed``): every profile (same data keys), every variant."""
    from async_vision.client_app import app as client_app
    from async_vision.server_app import main as app_main

    (group,) = groups(profiles)
    overrides = {**COMMON, **DATA.get(group[0], {}), "seed": seed}
    cfg = fused_run_config(APP_DIR, overrides)
    cells = {p: profile_overrides(p, quick, max_time) for p in group}
    chosen = {k: VARIANTS[k] for k in (variants or VARIANTS)}
    t0 = time.time()
    run_app(
        sweep.cells_server_app(cells, seed, runs_dir, chosen, app_main=app_main),
        client_app,
        num_supernodes=NUM_CLIENTS,
        run_config=cfg,
        backend=backend,
        inline_workers=workers,
    )
    return time.time() - t0


def _bytes(out: Path, strategy: str) -> tuple[int, int]:
    """Total ``(uplink, downlink)`` bytes of a run's ``<strategy>-bytes.csv``.

    The totals are kept in ``<strategy>-bytes-total.json`` (committed; the CSVs are not).
    """
    total = out / f"{strategy}-bytes-total.json"
    if total.exists():
        saved = json.loads(total.read_text())
        return saved["bytes_up"], saved["bytes_down"]
    up = down = 0
    with (out / f"{strategy}-bytes.csv").open() as fh:
        for row in csv.DictReader(fh):
            up += int(row["bytes_up"])
            down += int(row["bytes_down"])
    total.write_text(json.dumps({"bytes_up": up, "bytes_down": down}))
    return up, down


def summarize_variant(cell: Path, variant: str) -> dict[str, Any]:
    """The summary of one variant's run in a cell directory (raises if it did not run)."""
    out = cell / variant
    strategy = VARIANTS[variant]["strategy"]
    row = summarize(out, strategy, TARGETS[0])
    points = row["curve"]
    for target in TARGETS:
        reached = [t for t, acc in points if acc >= target]
        row[f"time_to_{round(target * 100)}"] = reached[0] if reached else None
    evals = load_result(out / f"{strategy}.json")["evaluate_metrics_serverapp"]
    slow = sorted(
        (float(m["time"]), float(m[SLOW_METRIC])) for m in evals.values() if SLOW_METRIC in m
    )
    row["slow_curve"] = slow
    row["final_slow_accuracy"] = slow[-1][1] if slow else None
    row["bytes_up"], row["bytes_down"] = _bytes(out, strategy)
    row["strategy"] = variant
    return row


def aggregate(runs_dir: Path, profiles: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per (profile, variant): the summaries of every seed that finished."""
    return sweep.aggregate(runs_dir, profiles, seeds, list(VARIANTS), summarize_variant)


def _times(rows: list[dict[str, Any]], key: str) -> str:
    ttt = [r[key] for r in rows if r[key] is not None]
    head = f"{len(ttt)}/{len(rows)}"
    return f"{mean_sd(ttt, 1)} ({head})" if ttt else f"not reached ({head})"


def table(agg: dict[str, Any]) -> str:
    """Markdown table of every (profile, variant)."""
    lines = [
        "| profile | strategy | time to 80% (virtual s) | time to 90% (virtual s) "
        "| final acc. | final acc. on labels 8, 9 | updates applied | server updates "
        "| MB up | MB down |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for profile, per in agg.items():
        for name, rows in per.items():
            if not rows:
                continue
            slow = [r["final_slow_accuracy"] for r in rows if r["final_slow_accuracy"] is not None]
            cols = [
                profile,
                LABELS[name],
                _times(rows, "time_to_80"),
                _times(rows, "time_to_90"),
                mean_sd([r["final_accuracy"] for r in rows]),
                mean_sd(slow) if slow else "n/a",
                mean_sd([r["updates_applied"] for r in rows], 0),
                mean_sd([r["server_versions"] for r in rows], 0),
                mean_sd([r["bytes_up"] / 1e6 for r in rows], 1),
                mean_sd([r["bytes_down"] / 1e6 for r in rows], 1),
            ]
            lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def goals(agg: dict[str, Any]) -> dict[str, Any]:
    """The issue's two goals, measured on the means over seeds.

    (a) per heterogeneous profile: the flwr-ext strategy (not FedAvg) with the shortest mean time
    to 90%, its ratio to FedAvg's time to 90% (``None`` when FedAvg did not reach 90% in every
    seed: the budget then bounds the ratio from above) and its final accuracy minus FedAvg's.
    (b) intertwined: final accuracy on labels 8, 9 of every strategy minus FedAvg's.
    """
    out: dict[str, Any] = {"a": {}, "b": {}}
    for profile in ("exponential", "skewed", "intertwined"):
        per = agg.get(profile, {})
        base = per.get("fedavg-timed") or []
        if not base:
            continue
        base_t = [r["time_to_90"] for r in base]
        base_final = _mean([r["final_accuracy"] for r in base])
        budget = base[0]["final_time"]
        cands = {}
        for name, rows in per.items():
            if name == "fedavg-timed" or not rows:
                continue
            t = [r["time_to_90"] for r in rows]
            if all(v is not None for v in t):
                cands[name] = _mean(t)
        best = min(cands, key=cands.get) if cands else None
        entry: dict[str, Any] = {
            "fedavg_time_to_90": _mean(base_t) if None not in base_t else None,
            "fedavg_final": base_final,
            "budget": budget,
            "best": best,
        }
        if best is not None:
            t_best = cands[best]
            fedavg_t = entry["fedavg_time_to_90"]
            entry["best_time_to_90"] = t_best
            entry["ratio"] = t_best / fedavg_t if fedavg_t else None
            entry["ratio_upper_bound"] = t_best / budget
            entry["final_minus_fedavg"] = _mean([r["final_accuracy"] for r in per[best]]) - (
                base_final
            )
        out["a"][profile] = entry
    per = agg.get("intertwined", {})
    base = per.get("fedavg-timed") or []
    if base and base[0]["final_slow_accuracy"] is not None:
        ref = _mean([r["final_slow_accuracy"] for r in base])
        out["b"] = {
            name: _mean([r["final_slow_accuracy"] for r in rows]) - ref
            for name, rows in per.items()
            if rows and name != "fedavg-timed"
        }
        out["b"]["fedavg_slow_accuracy"] = ref
    return out


def plot(agg: dict[str, Any], path: Path) -> Path:
    """Accuracy against virtual time per profile, plus the intertwined labels 8, 9."""
    panels = dict(agg)
    if any(r and r[0]["slow_curve"] for r in agg.get("intertwined", {}).values()):
        panels["intertwined: labels 8, 9"] = {
            name: [{**r, "curve": r["slow_curve"]} for r in rows]
            for name, rows in agg["intertwined"].items()
        }
    return sweep.plot_curves(panels, path, TARGETS, LABELS)


def _slim(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in ("curve", "slow_curve")}


def write_outputs(out: Path, profiles: list[str], seeds: list[int]) -> str:
    """``results.md``, ``results.json`` and ``accuracy_vs_time.png`` from ``<out>/runs``."""
    agg = aggregate(out / "runs", profiles, seeds)
    md = table(agg)
    (out / "results.md").write_text(md + "\n")
    slim = {p: {n: [_slim(r) for r in rows] for n, rows in per.items()} for p, per in agg.items()}
    meta = {"targets": TARGETS, "num_clients": NUM_CLIENTS, "seeds": seeds}
    meta |= {"common": COMMON, "variants": VARIANTS, "profiles": PROFILES, "data": DATA}
    payload = {**meta, "goals": goals(agg), "results": slim}
    (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
    if any(rows for per in agg.values() for rows in per.values()):
        plot(agg, out / "accuracy_vs_time.png")
    return md


def main(argv: list[str] | None = None) -> int:
    """Run the missing simulations, then write the table, the JSON and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="default: here (quick: here/quick)")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_FRACTION:g} of the budgets")
    ap.add_argument("--rerun", action="store_true", help="ignore finished runs")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--timeout", type=float, default=1500.0, help="per simulation (s)")
    ap.add_argument("--backend", choices=["inline", "simulation"], default="inline")
    ap.add_argument("--workers", type=int, default=2, help="inline worker processes")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of VARIANTS")
    ap.add_argument("--max-time", type=float, default=0.0, help="budget of every profile (s)")
    ap.add_argument("--one", nargs=2, metavar=("PROFILES", "SEED"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = args.out or (HERE / "quick" if args.quick else HERE)
    runs_dir = out / "runs"
    variants = [v for v in args.variants.split(",") if v]
    if args.one:
        profiles, seed = args.one[0].split(","), int(args.one[1])
        opts = (args.quick, args.backend, args.workers, variants, args.max_time)
        run_one(profiles, seed, runs_dir, *opts)
        return 0
    profiles = [p for p in args.profiles.split(",") if p]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    t0 = time.time()
    for seed in [] if args.aggregate_only else seeds:
        for group in groups(profiles):
            todo = [p for p in group if args.rerun or not sweep.is_done(runs_dir, p, seed)]
            if not todo:
                continue

            def command(cells: list[str], seed: int = seed) -> list[str]:
                cmd = [sys.executable, __file__, "--one", ",".join(cells), str(seed)]
                cmd += ["--out", str(out), "--backend", args.backend]
                cmd += ["--workers", str(args.workers), "--variants", ",".join(variants)]
                cmd += ["--max-time", str(args.max_time)]
                return cmd + (["--quick"] if args.quick else [])

            wall = sweep.run_isolated(command, todo, seed, runs_dir, args.timeout)
            print(f"[{time.time() - t0:7.1f} s] seed {seed} {','.join(todo)}: {wall:.1f} s")
    md = write_outputs(out, profiles, seeds)
    print(md)
    print(f"total wall: {time.time() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
