"""Test-local Flower apps for the engine's failure handling in a real simulation.

The ClientApp is a plain FedAvg-style one on a tiny numpy model: partition 1 raises on odd
``server-round`` values, partition 2 always answers NaN. The ServerApp runs FedAsync on a
virtual clock and writes the result, CSV and counters to ``output-dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.strategies import FedAsync

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    rnd = int(msg.content["config"]["server-round"])
    if pid == 1 and rnd % 2 == 1:
        raise RuntimeError(f"injected failure at round {rnd}")
    w = msg.content["arrays"]["w"].numpy()
    new = w + 0.1 * (float(pid) - w)
    if pid == 2:
        new = np.full_like(w, np.nan)
    metrics = MetricRecord({"num-examples": 10, "partition-id": pid, "num-steps": 5})
    reply = RecordDict({"arrays": ArrayRecord({"w": Array(new)}), "metrics": metrics})
    return Message(reply, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"]))
    res = FedAsync(alpha=0.5).start(
        grid,
        ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
        num_rounds=30,
        timeout=120,
        clock=VirtualClock(DeviceProfile("homogeneous", mean_step_time=0.1), seed=0),
        min_nodes=4,
        max_failures=3,
        wall_timeout=150,
    )
    res.write_csv(out / "updates.csv")
    final = res.arrays["w"].numpy().tolist()
    info = {"counters": res.counters, "reasons": res.reasons, "final": final}
    (out / "result.json").write_text(json.dumps(info))


# --- one slow node under a real clock (issue 15, item 1) -------------------------------------
#: Seconds partition 0 sleeps per job in ``slow_client_app``; the server's job timeout is
#: ``SLOW_TIMEOUT``, so every job sent to partition 0 times out while its ClientApp still runs.
SLOW_SLEEP = 3.0
SLOW_TIMEOUT = 1.0

slow_client_app = ClientApp()


@slow_client_app.train()
def slow_train(msg: Message, context: Context) -> Message:
    import time

    pid = int(context.node_config["partition-id"])
    time.sleep(SLOW_SLEEP if pid == 0 else 0.05)
    w = msg.content["arrays"]["w"].numpy()
    metrics = MetricRecord({"num-examples": 10, "num-steps": 5})
    reply = RecordDict({"arrays": ArrayRecord({"w": Array(w + 0.01)}), "metrics": metrics})
    reply["identity"] = ConfigRecord({"partition-id": pid})
    return Message(reply, reply_to=msg)


slow_server_app = ServerApp()


@slow_server_app.main()
def slow_main(grid: Grid, context: Context) -> None:
    from flwr_ext.asyncfl import RealClock
    from flwr_ext.strategies import FedBuff

    out = Path(str(context.run_config["output-dir"]))
    res = FedBuff(buffer_size=2).start(
        grid,
        ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
        num_rounds=int(context.run_config["num-server-rounds"]),
        timeout=SLOW_TIMEOUT,
        clock=RealClock(),
        min_nodes=5,
        warmup=True,  # the Simulation Engine takes seconds to start its ClientApps
        max_failures=3,
        wall_timeout=120,
    )
    res.write_csv(out / "updates.csv")
    info = {"stop": res.stop_reason, "counters": res.counters, "reasons": res.reasons}
    (out / "result.json").write_text(json.dumps(info))
