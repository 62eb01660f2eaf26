"""ServerApp: the strategy of the run config (FedBuff K = 3) on a virtual clock from a trace.

Writes ``<output-dir>/<strategy>-bench.json``: the engine's counters, the wall time of
``strategy.start`` and the summed ``train-s`` of the applied updates; the per-update CSV and the
result JSON.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_ext.results import save_result
from flwr_ext.strategies import build_strategy
from flwr_ext.strategies.factory import build_start_kwargs
from inline_mlp.task import make_model, test_set

app = ServerApp()
HERE = Path(__file__).resolve().parents[1]


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the strategy; save counters and timings."""
    torch.set_num_threads(1)
    cfg = dict(context.run_config)
    trace = Path(str(cfg.get("profile-trace", "trace.csv")))
    cfg["profile-trace"] = str(trace if trace.is_absolute() else HERE / trace)
    torch.manual_seed(int(cfg.get("seed", 0)))
    x_test, y_test = test_set()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        return MetricRecord({"accuracy": acc})

    t0 = time.perf_counter()
    result = build_strategy(cfg).start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model().state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
        timeout=3600.0,
        train_config=ConfigRecord({"lr": float(cfg["learning-rate"])}),
        evaluate_fn=evaluate_fn,
        **build_start_kwargs(cfg),
    )
    wall = time.perf_counter() - t0
    train_s = sum(
        float(m.get("train-s", 0.0)) * int(m["num-updates"])
        for m in result.train_metrics_clientapp.values()
    )
    last = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    if cfg.get("output-dir"):
        out = Path(str(cfg["output-dir"]))
        out.mkdir(parents=True, exist_ok=True)
        save_result(result, out, name=str(cfg["strategy"]))
        result.write_csv(out / f"{cfg['strategy']}-updates.csv")
        info = {
            "start_wall_s": wall,
            "train_s_applied": train_s,
            "accuracy": float(last["accuracy"]),
            "counters": result.counters,
        }
        (out / f"{cfg['strategy']}-bench.json").write_text(json.dumps(info, indent=1))
