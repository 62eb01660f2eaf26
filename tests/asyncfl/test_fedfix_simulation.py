"""FedFix in a real Flower simulation (Ray) of the async-vision app, intertwined profile.

Node 0 is slow (3x step time) and alone holds digits 8 and 9; the ServerApp builds FedFix from
the run config (``strategy = "fedfix"``, ``fedfix-dt``), so this also exercises the factory,
the ``intertwined`` partitioner in the ClientApp and the ``intertwined`` device profile.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from async_vision.client_app import app as client_app
from async_vision.server_app import app as server_app

from flwr_ext.results import load_result
from flwr_ext.sim import fused_run_config, run_app

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "async-vision"


@pytest.mark.slow  # ~20 s (Ray start-up, 6 versions)
def test_fedfix_three_nodes_intertwined_learns(tmp_path) -> None:
    cfg = fused_run_config(
        APP_DIR,
        {
            "strategy": "fedfix",
            "num-server-rounds": 6,
            "clock": "virtual",
            "local-steps": 10,
            "profile": "intertwined",
            "profile-mean-step-time": 0.1,
            "intertwined-slow-nodes": 1,
            "intertwined-slow-classes": 2,
            "intertwined-slow-factor": 3.0,
            "partitioner": "intertwined",
            "fedfix-dt": 1.5,
            "output-dir": str(tmp_path),
        },
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg)

    res = load_result(tmp_path / "fedfix.json")
    evals = res["evaluate_metrics_serverapp"]
    assert evals["0"]["accuracy"] < 0.2
    assert evals["6"]["accuracy"] > 0.3
    rounds = res["train_metrics_clientapp"]
    ticks = [rounds[str(v)]["tick"] for v in range(1, 7)]
    assert ticks == sorted(ticks) and len(set(ticks)) == 6
    times = [rounds[str(v)]["time"] for v in range(1, 7)]
    assert all(math.isclose(t, 1.5 * k) for t, k in zip(times, ticks, strict=True))

    info = json.loads((tmp_path / "fedfix-counters.json").read_text())
    assert info["stop_reason"] == "num_rounds reached"
    assert info["counters"]["error-replies"] == 0
    with (tmp_path / "fedfix-updates.csv").open() as fh:
        recs = [r for r in csv.DictReader(fh) if r["accepted"] == "True"]
    slow = [r for r in recs if r["node"] == "0"]
    fast = [r for r in recs if r["node"] != "0"]
    # the slow node (3 s of compute plus transfers) is aggregated every ceil(tau / 1.5) >= 2
    # ticks, the fast ones (1 s plus transfers) every tick
    assert slow and len(fast) >= 3 * len(slow)
    assert all(int(r["num_steps"]) == 10 for r in recs)
