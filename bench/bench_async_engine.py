"""Server CPU of the asynchronous engine per applied update, and a 200-client scale run.

Both parts use the in-process ``FakeGrid`` (``flwr_ext.asyncfl.testing``), not Ray: the
"client" adds precomputed noise to the model it receives, and the time spent in it is measured
and subtracted, so what is left is the server's work per update (message building, pulling,
decoding/validation, staleness bookkeeping, aggregation, version management). The reference is
the bare NumPy arithmetic of the same aggregation on the same arrays, measured in the same run.

1. ~1M-parameter model (1,000,000 float32 in 4 tensors), 20 clients, virtual clock.
2. 200 clients, DigitsCNN-sized model (38,282 params), exponential profile, FedBuff K=20.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.strategies import FedAsync, FedAvgTimed, FedBuff

logging.getLogger("flwr").setLevel(logging.ERROR)

SHAPES_1M = {"conv": (64, 32, 3, 3), "fc1": (512, 1500), "fc2": (1500, 100), "out": (48,)}


def make_model(shapes: dict[str, tuple]) -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()})


def make_client(shapes: dict[str, tuple]):
    noise = {
        k: (0.01 * np.random.default_rng(1).normal(size=s)).astype(np.float32)
        for k, s in shapes.items()
    }

    def client(pid: int, msg) -> RecordDict:
        arrs = msg.content["arrays"]
        new = ArrayRecord({k: Array(v.numpy() + noise[k]) for k, v in arrs.items()})
        metrics = MetricRecord({"num-examples": 50, "partition-id": pid, "num-steps": 10})
        return RecordDict({"arrays": new, "metrics": metrics})

    return client


def bare_numpy_mix(shapes: dict[str, tuple], reps: int = 20) -> float:
    """Seconds for one FedAsync mix ``(1-a) x + a y`` on plain numpy arrays (reference)."""
    rng = np.random.default_rng(0)
    x = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    y = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    t0 = time.thread_time()
    for _ in range(reps):
        x = {k: (0.5 * x[k] + 0.5 * y[k]).astype(np.float32) for k in x}
    return (time.thread_time() - t0) / reps


def overhead(strategy, shapes, nodes: int, updates: int) -> dict[str, float]:
    grid = FakeGrid(make_client(shapes), nodes, seed=0, per_pull=4)
    clock = VirtualClock(DeviceProfile("exponential", mean_step_time=0.1), seed=0)
    initial = make_model(shapes)  # the harness's input, built before the server's time starts
    t0, c0 = time.perf_counter(), time.thread_time()
    res = strategy.start(grid, initial, num_rounds=updates, clock=clock, poll_interval=0)
    wall = time.perf_counter() - t0
    applied = res.counters["updates-applied"]
    # CPU time of this thread (the engine runs in it), without the in-process clients' share:
    # less sensitive than wall time to other processes on a shared machine
    server = time.thread_time() - c0 - grid.client_cpu
    return {
        "wall": wall,
        "client": grid.client_time,
        "server": server,
        "applied": applied,
        "per_update_ms": 1e3 * server / applied,
        "versions": res.counters["versions"],
        "virtual": res.counters["final-time"],
        "staleness": res.counters["mean-staleness"],
    }


def main() -> None:
    n = sum(int(np.prod(s)) for s in SHAPES_1M.values())
    print(
        f"[1] server overhead per applied update, {n:,}-parameter model, 20 clients, "
        "FakeGrid (in-process, no Ray), virtual clock; the bare NumPy FedAsync mix on the same "
        "arrays is timed right before and after each case (the machine's speed drifts)"
    )
    cases = [
        ("FedAsync", FedAsync(), 100),
        ("FedBuff K=10", FedBuff(buffer_size=10), 100),
        ("FedAvgTimed", FedAvgTimed(min_train_nodes=20), 5),
    ]
    for name, strat, rounds in cases:
        before = bare_numpy_mix(SHAPES_1M)
        r = overhead(strat, SHAPES_1M, 20, rounds)
        ref = float(np.median([before, bare_numpy_mix(SHAPES_1M)]))
        print(
            f"    {name:13s} {r['applied']:5.0f} updates: server {r['server']:6.2f} s, "
            f"client fn {r['client']:5.2f} s -> {r['per_update_ms']:6.2f} ms/update "
            f"= {r['per_update_ms'] / (1e3 * ref):5.1f}x the bare mix ({1e3 * ref:.2f} ms)"
        )
    print("[2] scale: 200 clients, 38,282-parameter model, exponential profile, FedBuff K=20")
    shapes = {"w": (38_218,), "b": (64,)}
    r = overhead(FedBuff(buffer_size=20), shapes, 200, 100)
    print(
        f"    {r['applied']:.0f} updates in {r['versions']:.0f} server steps, "
        f"{r['virtual']:.1f} s virtual, wall {r['wall']:.2f} s "
        f"({r['applied'] / r['wall']:.0f} updates/s; server {r['per_update_ms']:.2f} ms/update),"
        f" mean staleness {r['staleness']:.2f}"
    )


if __name__ == "__main__":
    main()
