"""async-vision under the intertwined partition: slow-class accuracy and the conversions file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from async_vision.client_app import app as client_app
from async_vision.server_app import app as server_app

from flwr_ext.results import load_result
from flwr_ext.sim import fused_run_config, run_app

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "async-vision"


def test_intertwined_run_reports_slow_class_accuracy_and_conversions(tmp_path) -> None:
    cfg = fused_run_config(
        APP_DIR,
        {
            "strategy": "fedbuff",
            "buffer-size": 1,
            "num-server-rounds": 12,
            "local-steps": 3,
            "momentum": 0.0,
            "partitioner": "intertwined",
            "profile": "intertwined",
            "intertwined-slow-nodes": 1,
            "intertwined-slow-factor": 6.0,
            "min-train-nodes": 3,
            "output-dir": str(tmp_path),
            # keys of the app's pyproject, so Flower takes them as --run-config overrides
            "stale-conversion": True,
            "stale-conversion-threshold": 2,
            "stale-conversion-samples": 8,
            "stale-conversion-iterations": 5,
        },
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg, backend="inline")

    evals = load_result(tmp_path / "fedbuff.json")["evaluate_metrics_serverapp"]
    assert all(0.0 <= m["accuracy-slow-classes"] <= 1.0 for m in evals.values())
    assert any(m["accuracy-slow-classes"] != m["accuracy"] for m in evals.values())
    with (tmp_path / "fedbuff-conversions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows, "the slow node's updates (staleness > 2) were converted"
    assert {"version", "node", "staleness", "residual", "accepted", "seconds"} <= set(rows[0])
    assert all(float(r["staleness"]) > 2 and float(r["node"]) == 0 for r in rows)
    assert all(float(r["seconds"]) > 0 for r in rows)
    counters = json.loads((tmp_path / "fedbuff-counters.json").read_text())["counters"]
    assert counters["versions"] == 12
