"""A real Flower Simulation Engine run with 1,000 SuperNodes and at most 50 jobs in flight.

The numpy-only ``bench/apps/light-async`` app (softmax regression on digits, IID shards; the
shard of 1,797 x 0.8 images over 1,000 nodes is 1-2 images each), FedBuff K = 10 on a virtual
clock with ``max-concurrency = 50``: the engine registers all 1,000 SuperNodes and draws the 50
busy ones uniformly. Prints wall time, updates, distinct nodes used and the engine's counters.

Run: ``python bench/bench_sim_1000.py [--nodes 1000] [--cap 50] [--rounds 30]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
APP = ROOT / "apps" / "light-async"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--cap", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    sys.path.insert(0, str(APP))
    from light_async.client_app import app as client_app
    from light_async.server_app import app as server_app

    from flwr_ext.sim import fused_run_config, run_app

    out = Path(tempfile.mkdtemp(prefix="sim1000-"))
    cfg = fused_run_config(
        APP,
        {
            "strategy": "fedbuff",
            "clock": "virtual",
            "profile": "exponential",
            "num-server-rounds": args.rounds,
            "buffer-size": 10,
            "max-concurrency": args.cap,
            "min-train-nodes": args.nodes,
            "timeout": 600.0,
            "output-dir": str(out),
        },
    )
    t0 = time.perf_counter()
    run_app(
        server_app,
        client_app,
        num_supernodes=args.nodes,
        run_config=cfg,
        num_cpus_per_client=1.0,
    )
    wall = time.perf_counter() - t0
    info = json.loads((out / "fedbuff-counters.json").read_text())
    c = info["counters"]
    with (out / "fedbuff-updates.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    nodes = {r["node"] for r in rows}
    print(
        f"{args.nodes} SuperNodes, max-concurrency {args.cap}: {c['versions']:.0f} versions, "
        f"{c['updates-applied']:.0f} updates applied, {c['jobs-dispatched']:.0f} jobs on "
        f"{len(nodes)} distinct nodes, {c['nodes-discovered']:.0f} nodes registered, "
        f"wall {wall:.1f} s (engine CPU {c['engine-cpu-ms-per-update']:.2f} ms/update, "
        f"peak version store {c.get('peak-version-store-bytes', 0) / 1024:.0f} KiB), "
        f"stop: {info['stop_reason']}"
    )


if __name__ == "__main__":
    main()
