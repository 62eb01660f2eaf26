"""How many ClientApps Flower 1.42's Simulation Engine runs at once (issue 15, item 3).

Each ClientApp call sleeps ``SLEEP`` seconds and records its start and end (wall clock) in a
file; the ServerApp sends one message to each of 10 SuperNodes at once. The largest number of
overlapping calls is the concurrency. Flower 1.42 builds ``floor(Ray CPUs / num_cpus)`` actors
but drives them from a ``ThreadPoolExecutor()`` of Python's default size, so at most
``min(32, os.cpu_count() + 4)`` run at once (:func:`flwr_ext.sim.simulation_concurrency`);
``run_app(max_concurrent=n)`` sets the actor count (``init_args.num_cpus = n``, one CPU each).
Two real Simulation Engine runs: marked slow.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_ext.sim import run_app, simulation_concurrency

NODES = 10
SLEEP = 2.0


def _apps(log_dir: Path) -> tuple[ServerApp, ClientApp]:
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        t0 = time.time()
        time.sleep(SLEEP)
        pid = int(context.node_config["partition-id"])
        (log_dir / f"{pid}.txt").write_text(f"{t0} {time.time()}")
        metrics = MetricRecord({"num-examples": 1})
        return Message(
            RecordDict({"arrays": msg.content["arrays"], "metrics": metrics}), reply_to=msg
        )

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        while len(list(grid.get_node_ids())) < NODES:
            time.sleep(0.2)
        msgs = [
            Message(
                RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(1))})}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
            )
            for nid in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(msgs, timeout=300))
        assert len(replies) == NODES and not any(r.has_error() for r in replies)

    return server, client


def _max_overlap(log_dir: Path) -> int:
    spans = [tuple(map(float, p.read_text().split())) for p in log_dir.glob("*.txt")]
    assert len(spans) == NODES
    return max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)


def _run(tmp: Path, **kwargs) -> int:
    tmp.mkdir()
    server, client = _apps(tmp)
    try:
        run_app(server, client, num_supernodes=NODES, run_config={}, **kwargs)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    return _max_overlap(tmp)


@pytest.mark.slow
def test_simulation_engine_concurrency_cap_and_max_concurrent(tmp_path):
    cap = min(32, (os.cpu_count() or 1) + 4)
    if cap >= NODES:
        pytest.skip(f"cpu_count + 4 = {cap} >= {NODES} nodes: the cap does not bind here")
    # 0.1 CPU per ClientApp: floor(cpus / 0.1) >= 10 actors, but only cpu_count + 4 run at once
    assert _run(tmp_path / "many", num_cpus_per_client=0.1) == cap
    assert simulation_concurrency(0.1) == cap
    assert _run(tmp_path / "three", max_concurrent=3) == 3
