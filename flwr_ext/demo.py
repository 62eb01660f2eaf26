"""The main job (``make demo``): synchronous vs asynchronous FL under device heterogeneity.

Digits (embedded, 8x8), 20 SuperNodes, Dirichlet(0.5) label skew, exponential per-step
compute times (``flwr_ext.asyncfl.profiles``). FedAvg (time-accounted), FedAsync, FedBuff and
FedCompass run the packaged ``apps/async-vision`` app (loaded from its folder by its
``[tool.flwr.app.components]``, with Flower's own loader) in ONE run: the ServerApp runs the
strategies one after the other on the same SuperNodes, each from the same initial model with a
fresh virtual clock and the same virtual-time budget. Results come from the files the ServerApp
writes: a table (time to the target accuracy, final accuracy, mean staleness, updates applied)
and a PNG of accuracy against virtual time.

The comparison runs on the inline backend by default (:mod:`flwr_ext.inline`: the same ClientApp
and ServerApp, no Ray, the ClientApps in :data:`INLINE_WORKERS` warm worker processes; the clock
is virtual, so the results are those of Flower's Simulation Engine, bit for bit). Then one short
real Simulation Engine run (Ray) of the four strategies checks that promise on this machine: the
same short configuration runs on both backends and their per-update records must be identical
(wall-clock columns and the random node / message ids aside,
:data:`flwr_ext.inline.RANDOM_COLUMNS`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flwr_ext.inline import compare_runs
from flwr_ext.results import load_result
from flwr_ext.sim import fused_run_config, load_components, run_app

#: The packaged app the demo runs (a source checkout's ``apps/async-vision``; the wheel does not
#: ship apps, and the library never imports one: it is loaded from this folder).
APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "async-vision"

#: Warm worker processes of the inline backend for the comparison (ClientApps of different nodes
#: in parallel; the results do not depend on it).
INLINE_WORKERS = 2

LABELS = {
    "fedavg-timed": "FedAvg (timed)",
    "fedasync": "FedAsync",
    "fedbuff": "FedBuff",
    "fedcompass": "FedCompass",
}


def demo_config(quick: bool) -> tuple[int, dict[str, Any], float]:
    """``(num_supernodes, run-config overrides, target accuracy)`` of the demo."""
    overrides: dict[str, Any] = {
        "partitioner": "dirichlet",
        "dirichlet-alpha": 0.5,
        "clock": "virtual",
        "profile": "exponential",
        "profile-mean-step-time": 0.1,
        "profile-jitter": 0.1,
        "latency": 0.05,
        "local-steps": 10,
        "batch-size": 16,
        "learning-rate": 0.05,
        "num-server-rounds": 100_000,  # the virtual-time budget ends each run
        "max-time": 25.0,
        "eval-period": 1.0,
        "min-train-nodes": 20,
        "alpha": 0.6,
        "buffer-size": 5,
        "server-lr": 1.0,
        "staleness": "polynomial",
        "staleness-a": 0.5,
        "compass-q-min": 5,
        "compass-q-max": 20,
        "compass-lambda": 1.5,
        "seed": 0,
    }
    if quick:
        overrides.update({"max-time": 8.0, "min-train-nodes": 4, "eval-period": 1.0})
        return 4, overrides, 0.5
    return 20, overrides, 0.8


def strategies_available() -> list[str]:
    """The demo's strategies; FedCompass only if its module is importable."""
    names = ["fedavg-timed", "fedasync", "fedbuff"]
    try:
        import flwr_ext.strategies.fedcompass  # noqa: F401

        names.append("fedcompass")
    except ImportError:
        pass
    return names


def summarize(out_dir: Path, name: str, target: float) -> dict[str, Any]:
    """Time to ``target``, final accuracy, staleness and counts of one strategy's run."""
    evals = load_result(out_dir / f"{name}.json")["evaluate_metrics_serverapp"]
    points = sorted((float(m["time"]), float(m["accuracy"])) for m in evals.values())
    reached = [t for t, acc in points if acc >= target]
    info = json.loads((out_dir / f"{name}-counters.json").read_text())
    c = info["counters"]
    return {
        "strategy": name,
        "time_to_target": reached[0] if reached else None,
        "final_accuracy": points[-1][1] if points else float("nan"),
        "best_accuracy": max((a for _, a in points), default=float("nan")),
        "mean_staleness": c["mean-staleness"],
        "updates_applied": int(c["updates-applied"]),
        "server_versions": int(c["versions"]),
        "jobs": int(c["jobs-dispatched"]),
        "rejected": int(c["updates-rejected"] + c["error-replies"]),
        "final_time": c["final-time"],
        "curve": points,
    }


def plot(rows: list[dict[str, Any]], target: float, path: Path, title: str) -> Path:
    """Accuracy against virtual time, one line per strategy (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        t, acc = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        ax.plot(t, acc, label=LABELS.get(row["strategy"], row["strategy"]), lw=1.6)
    ax.axhline(target, color="grey", ls="--", lw=0.8, label=f"target {target:.2f}")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("test accuracy (centralized)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def app_components() -> tuple:
    """``apps/async-vision``'s ServerApp and ClientApp, loaded from :data:`APP_DIR`."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"the demo runs the packaged app in {APP_DIR}, which is not there: run it from a "
            "source checkout of flwr-ext (the wheel does not ship the apps)"
        )
    return load_components(APP_DIR)


def engine_check(out_dir: Path, names: list[str]) -> float:
    """One short real Simulation Engine run and the same run inline; their records must agree.

    Returns the Simulation Engine run's wall seconds. Raises ``AssertionError`` naming the first
    difference. ``drain-timeout`` lets every job end before the next strategy starts, so jobs a
    strategy left in flight never race the next strategy's first job for a node's Context in
    the Simulation Engine (see ``docs/simulation.md``).
    """
    server_app, client_app = app_components()
    num_nodes, overrides, _ = demo_config(quick=True)
    overrides = {**overrides, "max-time": 3.0, "drain-timeout": 120.0}
    walls = {}
    for backend in ("simulation", "inline"):
        out = out_dir / f"engine-check-{backend}"
        cfg = fused_run_config(
            APP_DIR, {**overrides, "strategy": ",".join(names), "output-dir": str(out)}
        )
        t0 = time.time()
        run_app(server_app, client_app, num_supernodes=num_nodes, run_config=cfg, backend=backend)
        walls[backend] = time.time() - t0
    diffs = [
        d
        for name in names
        for d in compare_runs(
            out_dir / "engine-check-simulation", out_dir / "engine-check-inline", name
        )
    ]
    if diffs:
        raise AssertionError("inline and Simulation Engine runs differ: " + "; ".join(diffs[:3]))
    return walls["simulation"]


def run_demo(
    out_dir: Path, quick: bool = False, backend: str = "inline", check_engine: bool = True
) -> dict[str, dict]:
    """Run the comparison in one run, print the table, save CSV/JSON/PNG.

    Parameters
    ----------
    out_dir : Path
        Where result files go (per strategy JSON + per-update CSV, ``summary.json``,
        ``accuracy_vs_time.png``).
    quick : bool
        4 SuperNodes and a short time budget (smoke test).
    backend : str
        ``"inline"`` (default; virtual clock, no Ray) or ``"simulation"`` (Flower's Simulation
        Engine) for the comparison.
    check_engine : bool
        Also run :func:`engine_check` (one short real Simulation Engine run).
    """
    server_app, client_app = app_components()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=120)
    num_nodes, overrides, target = demo_config(quick)
    names = strategies_available()
    cfg = fused_run_config(
        APP_DIR, {**overrides, "strategy": ",".join(names), "output-dir": str(out_dir)}
    )
    console.rule(
        f"{', '.join(names)}: {num_nodes} SuperNodes, exponential profile, "
        f"{cfg['max-time']:.0f} s of virtual time each, {backend} backend"
    )
    t0 = time.time()
    run_app(
        server_app,
        client_app,
        num_supernodes=num_nodes,
        run_config=cfg,
        backend=backend,
        inline_workers=INLINE_WORKERS,
    )
    wall = time.time() - t0
    rows = [summarize(out_dir, name, target) for name in names]

    table = Table(
        title=f"flwr-ext demo: digits, {num_nodes} clients, Dirichlet 0.5, exponential speeds "
        f"(one run, {backend} backend, {wall:.0f} s wall)"
    )
    for col in (
        "strategy",
        f"time to {target:.0%} (virtual s)",
        "final acc.",
        "best acc.",
        "mean staleness",
        "updates applied",
        "server updates",
    ):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for r in rows:
        ttt = f"{r['time_to_target']:.1f}" if r["time_to_target"] is not None else "not reached"
        table.add_row(
            LABELS.get(r["strategy"], r["strategy"]),
            ttt,
            f"{r['final_accuracy']:.3f}",
            f"{r['best_accuracy']:.3f}",
            f"{r['mean_staleness']:.2f}",
            str(r["updates_applied"]),
            str(r["server_versions"]),
        )
    console.print(table)
    png = plot(rows, target, out_dir / "accuracy_vs_time.png", "digits, exponential speeds")
    summary = {r["strategy"]: {k: v for k, v in r.items() if k != "curve"} for r in rows}
    info: dict[str, Any] = {"wall_s": wall, "backend": backend, "target": target, "rows": summary}
    console.print(f"plot: {png}   per-update CSVs and JSON: {out_dir}   wall: {wall:.1f} s")
    if check_engine:
        console.rule("check: a short real Simulation Engine run (Ray) against the inline backend")
        se_wall = engine_check(out_dir, names)
        info["engine_check_simulation_wall_s"] = se_wall
        console.print(
            f"Simulation Engine run ({se_wall:.0f} s wall) and inline run: identical per-update "
            "records and metrics (wall-clock columns and random ids aside)"
        )
    (out_dir / "summary.json").write_text(json.dumps(info, indent=1))
    return summary
