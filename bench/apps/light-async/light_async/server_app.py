"""ServerApp: an flwr_ext async strategy (``build_strategy``) on the real clock.

Writes, when ``output-dir`` is set: ``<strategy>.json`` (metrics per version),
``<strategy>-updates.csv`` (one row per finished job), ``<strategy>-ledger.csv`` (accepted
updates with message ids, written by the engine) and ``<strategy>-counters.json`` (engine
counters, reasons, stop reason, and the ServerApp's own process CPU time and wall time
around ``strategy.start``), and ``<strategy>-started.json`` just before the strategy starts (a
load test starts its CPU window there).

Engine keys (``build_start_kwargs``) include ``poll-interval`` (seconds between two
``grid.pull_messages`` calls of the engine when nothing arrived; default 0.02) and
``drain-timeout`` (wait for jobs still in flight after the end).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_ext.asyncfl import AsyncResult
from flwr_ext.results import save_result
from flwr_ext.strategies import build_strategy
from flwr_ext.strategies.factory import build_start_kwargs
from light_async.task import held_out_set, init_params, loss_and_accuracy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the strategy named by ``strategy``, run it, save the result."""
    cfg = dict(context.run_config)
    name = str(cfg.get("strategy", "fedasync"))
    if name == "fedavg":
        raise ValueError("light-async runs the flwr_ext async strategies; not 'fedavg'")
    x_test, y_test = held_out_set()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = {k: np.asarray(v.numpy()) for k, v in arrays.items()}
        loss, acc = loss_and_accuracy(params, x_test, y_test)
        return MetricRecord({"loss": loss, "accuracy": acc})

    out_dir = str(cfg.get("output-dir", "") or "")
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        marker = {"time": time.time(), "cpu-s": time.process_time()}
        (Path(out_dir) / f"{name}-started.json").write_text(json.dumps(marker))
    cpu0, wall0 = time.process_time(), time.monotonic()
    train_config = ConfigRecord(
        {"lr": float(cfg.get("learning-rate", 0.1)), "local-steps": int(cfg.get("local-steps", 5))}
    )
    result = build_strategy(cfg).start(
        grid=grid,
        initial_arrays=ArrayRecord({k: Array(v) for k, v in init_params().items()}),
        num_rounds=int(cfg.get("num-server-rounds", 20)),
        timeout=float(cfg.get("timeout", 120.0)),
        train_config=train_config,
        evaluate_fn=evaluate_fn,
        **build_start_kwargs(cfg),
    )
    cpu1, wall1 = time.process_time(), time.monotonic()
    if out_dir and isinstance(result, AsyncResult):
        out = Path(out_dir)
        save_result(result, out, name=name)
        result.write_csv(out / f"{name}-updates.csv")
        info = {
            "counters": result.counters,
            "reasons": result.reasons,
            "stop_reason": result.stop_reason,
            "serverapp-cpu-s": cpu1 - cpu0,
            "serverapp-wall-s": wall1 - wall0,
        }
        (out / f"{name}-counters.json").write_text(json.dumps(info, indent=1))
