"""FedZip / DGC / QSGD on the digits CNN: accuracy and uplink bytes after the same updates.

Every run is a real Flower simulation (Simulation Engine, Ray) of ``apps/async-vision`` started
with :func:`flwr_ext.sim.run_app` and the app's own run config (:func:`fused_run_config`), so the
ClientApp's ``compression_mod`` reads ``compression`` from the run config and the ServerApp wraps
Flower's ``FedAvg`` in ``Compressed``. Uplink bytes are the ServerApp's
``ArrayRecord.count_bytes()`` of the replies as received (``uplink-bytes-cumulative``); the
uncompressed baseline's bytes are its replies' raw float32 ArrayRecords.

Run (about 1-3 minutes per run on a shared 2-core machine)::

    .venv/bin/python baselines/fedzip/run.py                       # 5 settings x 3 seeds
    .venv/bin/python baselines/fedzip/run.py --seeds 0 --presets none fedzip
    .venv/bin/python baselines/fedzip/run.py --report-only         # table + plot from results/

Presets may carry options (``fedzip:dense_below=0``); the result folder is named after the
whole spec, so a run stays tied to the exact setting whatever the preset's defaults become.

Results go to ``baselines/fedzip/results/<preset>-s<seed>/`` (one JSON per run, kept, so an
interrupted sweep resumes); the table is printed and written to ``results/table.md`` and the
plot to ``accuracy_vs_bytes.png``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
APP = HERE.parents[1] / "apps" / "async-vision"
PRESETS = ("none", "fedzip", "fedzip:density=0.01", "dgc", "qsgd-8bit")


RESULTS = HERE / "results"


def _dir(preset: str, seed: int) -> Path:
    return RESULTS / f"{preset.replace(':', '_').replace('=', '')}-s{seed}"


def run_one(preset: str, seed: int, rounds: int, nodes: int, partitioner: str, out: Path) -> None:
    """One Flower simulation of async-vision (in a child process: Ray is started fresh)."""
    from async_vision.client_app import app as client_app
    from async_vision.server_app import app as server_app

    from flwr_ext.sim import fused_run_config, run_app

    cfg = fused_run_config(
        APP,
        {
            "strategy": "fedavg",
            "compression": preset,
            "num-server-rounds": rounds,
            "fraction-train": 1.0,
            "partitioner": partitioner,
            "seed": seed,
            "output-dir": str(out),
        },
    )
    run_app(server_app, client_app, num_supernodes=nodes, run_config=cfg, num_cpus_per_client=1)


def summarise(out: Path, nodes: int) -> dict:
    """Accuracy and cumulative uplink bytes per round from a run's saved Result."""
    res = json.loads((out / "fedavg.json").read_text())
    acc = {int(r): m["accuracy"] for r, m in res["evaluate_metrics_serverapp"].items()}
    train = {int(r): m for r, m in res["train_metrics_clientapp"].items()}
    rounds = sorted(r for r in acc if r > 0)
    cum, total = {}, 0
    for r in rounds:
        m = train.get(r, {})
        if "uplink-bytes-cumulative" in m:
            cum[r] = int(m["uplink-bytes-cumulative"])
        else:  # uncompressed: Flower's FedAvg has no byte metrics; every reply is raw float32
            total += nodes * raw_update_bytes()
            cum[r] = total
    return {
        "rounds": rounds,
        "accuracy": [acc[r] for r in rounds],
        "uplink": [cum[r] for r in rounds],
        "initial": acc.get(0),
    }


def raw_update_bytes() -> int:
    """``count_bytes()`` of one uncompressed DigitsCNN reply ArrayRecord (float32)."""
    from flwr.app import ArrayRecord

    from flwr_ext.vision import DigitsCNN

    return ArrayRecord(DigitsCNN().state_dict()).count_bytes()


def report(
    presets: list[str],
    seeds: list[int],
    nodes: int,
    rounds: int,
    checkpoints: list[int] | None = None,
) -> str:
    """Markdown table: accuracy and uplink bytes after ``checkpoints`` rounds (default: thirds)."""
    import numpy as np

    runs = {}
    for p in presets:
        for s in seeds:
            d = _dir(p, s)
            if (d / "fedavg.json").is_file():
                runs[(p, s)] = summarise(d, nodes)
    base = {s: runs[("none", s)] for s in seeds if ("none", s) in runs}
    checkpoints = sorted(set(checkpoints or {rounds // 3, 2 * rounds // 3, rounds}) - {0})
    lines = [
        "| preset | seeds | updates | accuracy (mean ± sd) | Δ vs none (points) | uplink bytes | "
        "fewer bytes than none |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in presets:
        got = [s for s in seeds if (p, s) in runs]
        if not got:
            continue
        for c in checkpoints:
            accs = np.array([runs[(p, s)]["accuracy"][c - 1] for s in got])
            ups = np.array([runs[(p, s)]["uplink"][c - 1] for s in got])
            deltas = [
                100 * (runs[(p, s)]["accuracy"][c - 1] - base[s]["accuracy"][c - 1])
                for s in got
                if s in base
            ]
            bups = [base[s]["uplink"][c - 1] for s in got if s in base]
            d = f"{np.mean(deltas):+.1f} (min {min(deltas):+.1f})" if deltas else "n/a"
            ratio = f"{np.mean(bups) / ups.mean():.1f}x" if bups else "n/a"
            lines.append(
                f"| {p} | {len(got)} | {c * nodes} | {accs.mean():.4f} ± {accs.std():.4f} | {d} | "
                f"{ups.mean():.0f} | {ratio} |"
            )
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "table.md").write_text(table + "\n")
    _plot(runs, presets, seeds, nodes)
    return table


def _label(preset: str) -> str:
    """Legend label: a spec that equals the default ``fedzip`` preset says so."""
    from flwr_ext.compression import get_preset

    try:
        same = preset != "fedzip" and get_preset(preset) == get_preset("fedzip")
    except ValueError:
        same = False
    return f"fedzip (the default preset: {preset.split(':', 1)[1]})" if same else preset


def _plot(runs: dict, presets: list[str], seeds: list[int], nodes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(
        zip(PRESETS, ("black", "tab:purple", "tab:pink", "tab:red", "tab:green"), strict=True)
    )
    colours.update(
        {
            "fedzip:dense_below=1000": "tab:purple",
            "fedzip:dense_below=0": "tab:blue",
            "fedzip:density=0.01,dense_below=0": "tab:cyan",
        }
    )
    for p in presets:
        for i, s in enumerate(seeds):
            if (p, s) not in runs:
                continue
            r = runs[(p, s)]
            ax.plot(
                r["uplink"],
                r["accuracy"],
                marker=".",
                color=colours.get(p),
                alpha=0.8,
                label=_label(p) if i == 0 else None,
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"cumulative uplink bytes (all {nodes} clients, ArrayRecord.count_bytes)")
    ax.set_ylabel("centralised test accuracy")
    ax.set_title("DigitsCNN, Flower FedAvg, one point per round (each line one seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS.parent / f"accuracy_vs_bytes{RESULTS.name[len('results') :]}.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument(
        "--checkpoints", nargs="+", type=int, help="rounds to tabulate (default: thirds)"
    )
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--partitioner", default="iid")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--force", action="store_true", help="rerun runs that have results")
    ap.add_argument("--results", default="results", help="results folder under baselines/fedzip")
    args = ap.parse_args()
    global RESULTS
    RESULTS = HERE / args.results
    if not args.report_only:
        ctx = mp.get_context("spawn")
        for seed in args.seeds:
            for preset in args.presets:
                out = _dir(preset, seed)
                if (out / "fedavg.json").is_file() and not args.force:
                    continue
                proc = ctx.Process(
                    target=run_one,
                    args=(preset, seed, args.rounds, args.nodes, args.partitioner, out),
                )
                proc.start()
                proc.join()
                print(f"{preset} seed {seed}: exit {proc.exitcode}", flush=True)
    print(report(args.presets, args.seeds, args.nodes, args.rounds, args.checkpoints))


if __name__ == "__main__":
    main()
