"""FedAST in a real Flower simulation (Ray): two DigitsCNN tasks over three SuperNodes.

The ClientApp is async-vision's (it trains only the ``task-id`` of each job and returns the
other task's arrays unchanged); the ServerApp is this test's: it stacks two DigitsCNN models
under ``task0/`` / ``task1/`` and evaluates each on the held-out digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from async_vision.client_app import app as client_app
from async_vision.client_app import centralized_test_set
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.sim import fused_run_config, run_app
from flwr_ext.strategies.fedast import FedAST, stack_tasks, task_arrays
from flwr_ext.vision import DigitsCNN, evaluate

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "async-vision"

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["output-dir"]))
    torch.manual_seed(0)
    initial = ArrayRecord(stack_tasks([ArrayRecord(DigitsCNN().state_dict()) for _ in range(2)]))
    x_test, y_test = centralized_test_set("digits", 0)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accs = {}
        for m in range(2):
            model = DigitsCNN()
            model.load_state_dict(ArrayRecord(task_arrays(arrays, m)).to_torch_state_dict())
            accs[f"accuracy-{m}"] = evaluate(model, x_test, y_test)[1]
        return MetricRecord(accs)

    strategy = FedAST(
        num_tasks=2,
        active=[2, 1],
        buffer_size=[2, 1],
        dynamic=False,
        task_config=[{"lr": 0.05}, {"lr": 0.1}],
    )
    res = strategy.start(
        grid,
        initial,
        num_rounds=8,
        timeout=120,
        train_config=ConfigRecord({"local-steps": 10}),
        evaluate_fn=evaluate_fn,
        clock=VirtualClock(DeviceProfile("homogeneous", mean_step_time=0.1, jitter=0.2), seed=0),
        min_nodes=3,
        wall_timeout=150,
    )
    evals = {int(v): dict(m) for v, m in res.evaluate_metrics_serverapp.items()}
    rounds = {int(v): dict(m) for v, m in res.train_metrics_clientapp.items()}
    rows = [(r.node, r.accepted, r.bytes_down, r.bytes_up) for r in res.updates]
    info = {
        "evals": evals,
        "rounds": rounds,
        "counters": res.counters,
        "rows": rows,
        "versions": strategy.task_versions,
        "stop": res.stop_reason,
    }
    (out / "fedast.json").write_text(json.dumps(info, default=float))


@pytest.mark.slow
def test_fedast_two_tasks_three_nodes_learn(tmp_path) -> None:
    cfg = fused_run_config(APP_DIR, {"output-dir": str(tmp_path)})
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg)
    info = json.loads((tmp_path / "fedast.json").read_text())
    assert info["stop"] == "num_rounds reached"
    assert info["counters"]["error-replies"] == 0
    assert info["counters"]["updates-rejected"] == 0
    assert sum(info["versions"]) == 8 and min(info["versions"]) >= 1
    evals = info["evals"]
    first, last = evals[str(0)], evals[str(max(int(v) for v in evals))]
    for m in range(2):  # 10 classes: chance is 0.1; both tasks learn
        assert first[f"accuracy-{m}"] < 0.2
        assert last[f"accuracy-{m}"] > 0.3
    tasks = [info["rounds"][str(v)]["task-id"] for v in range(1, 9)]
    assert set(tasks) == {0, 1}
    # today's cost: each job ships both models down and up (2x one DigitsCNN each way)
    one = ArrayRecord(DigitsCNN().state_dict()).count_bytes()
    replies = [r for r in info["rows"] if r[1]]
    assert replies and all(down >= 2 * one and up >= 2 * one for _, _, down, up in replies)
    print("fedast accuracies", {m: last[f"accuracy-{m}"] for m in range(2)}, "tasks", tasks)
