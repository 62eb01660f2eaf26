"""Server cost per applied update against the number of registered nodes (10 to 10,000).

Each size runs in a fresh process (so its peak RSS is its own), on the in-process ``FakeGrid``
(no Ray): FedBuff K = 20, a 38,282-parameter model, exponential device profile, virtual clock.
Two set-ups:

* ``--cap 100`` (default): at most 100 jobs in flight among N registered nodes, drawn by the
  engine's seeded uniform sampler (Papaya / FedBuff's cross-device runs);
* ``--cap 0``: every node busy (N jobs in flight), the set-up of the first measurement.

Printed per N: server CPU per applied update (thread CPU of the engine minus the in-process
clients'), its ratio to the smallest N of the same run, peak RSS, and the peak bytes of the
engine's version store. Run: ``python bench/bench_async_scaling.py [--cap 100] [--sizes ...]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

SHAPES = {"w": (38_218,), "b": (64,)}


def one(nodes: int, cap: int, updates: int) -> dict[str, float]:
    """Run one size in this process; return its figures."""
    from flwr_ext.asyncfl import DeviceProfile, VirtualClock
    from flwr_ext.asyncfl.testing import FakeGrid
    from flwr_ext.strategies import FedBuff

    logging.getLogger("flwr").setLevel(logging.ERROR)
    rng = np.random.default_rng(0)
    model = ArrayRecord(
        {k: Array(rng.normal(size=s).astype(np.float32)) for k, s in SHAPES.items()}
    )
    noise = {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}

    def client(pid: int, msg) -> RecordDict:
        arrs = msg.content["arrays"]
        new = ArrayRecord({k: Array(v.numpy() + noise[k]) for k, v in arrs.items()})
        metrics = MetricRecord({"num-examples": 50, "partition-id": pid, "num-steps": 10})
        return RecordDict({"arrays": new, "metrics": metrics})

    grid = FakeGrid(client, nodes, seed=0, per_pull=8)
    clock = VirtualClock(DeviceProfile("exponential", mean_step_time=0.1), seed=0)
    kwargs = {"max_concurrency": cap} if cap else {}
    c0, t0 = time.thread_time(), time.perf_counter()
    res = FedBuff(buffer_size=20).start(
        grid, model, num_rounds=updates // 20, clock=clock, poll_interval=0, **kwargs
    )
    cpu = time.thread_time() - c0 - getattr(grid, "client_cpu", grid.client_time)
    applied = res.counters["updates-applied"]
    return {
        "nodes": nodes,
        "applied": applied,
        "ms_per_update": 1e3 * cpu / applied,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_store_mb": res.counters.get("peak-version-store-bytes", float("nan")) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.cap, args.updates)))
        return
    label = f"at most {args.cap} jobs in flight" if args.cap else "every node busy"
    print(
        f"FedBuff K=20, 38,282 params, FakeGrid, virtual clock, {label}, "
        f"{args.updates} updates per size (one process each)"
    )
    print(f"{'nodes':>7} {'ms/update':>10} {'ratio':>6} {'peak RSS MB':>12} {'store MB':>9}")
    first = None
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--cap", str(args.cap)]
        cmd += ["--updates", str(args.updates)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        first = first or r["ms_per_update"]
        print(
            f"{n:7d} {r['ms_per_update']:10.3f} {r['ms_per_update'] / first:6.2f} "
            f"{r['peak_rss_mb']:12.0f} {r['peak_store_mb']:9.2f}"
        )


if __name__ == "__main__":
    main()
