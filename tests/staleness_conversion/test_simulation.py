"""StaleConversion(FedAsync) in a real Flower simulation (Ray) of the async-vision app."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from async_vision.client_app import app as client_app
from async_vision.server_app import app as server_app

from flwr_ext.results import load_result
from flwr_ext.sim import fused_run_config, run_app

APP_DIR = Path(__file__).resolve().parents[2] / "apps" / "async-vision"


@pytest.mark.slow  # about 25 s (Ray start-up and six conversions)
def test_fedasync_with_stale_conversion_three_nodes(tmp_path) -> None:
    cfg = fused_run_config(
        APP_DIR,
        {
            "strategy": "fedasync",
            "num-server-rounds": 6,
            "local-steps": 5,
            "momentum": 0.0,
            "clock": "virtual",
            "profile": "homogeneous",
            "profile-mean-step-time": 0.1,
            "profile-jitter": 0.3,
            "output-dir": str(tmp_path),
            "stale-conversion": True,
            "stale-conversion-threshold": 0,  # convert every update that is stale at all
            "stale-conversion-samples": 16,
            "stale-conversion-iterations": 20,
            "stale-conversion-max-residual": 100.0,  # accept all: the converted path is used
        },
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg)

    res = load_result(tmp_path / "fedasync.json")
    rounds = res["train_metrics_clientapp"]
    assert sorted(int(v) for v in rounds) == list(range(1, 7))
    info = json.loads((tmp_path / "fedasync-counters.json").read_text())
    assert info["stop_reason"] == "num_rounds reached"
    assert info["counters"]["error-replies"] == 0
    with (tmp_path / "fedasync-updates.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    applied = [r for r in rows if r["accepted"] == "True" and int(r["applied_in"]) >= 0]
    fresh = [r for r in applied if int(r["staleness"]) == 0]
    converted = [r for r in applied if int(r["staleness"]) > 0]
    assert fresh and converted
    for r in fresh:  # FedAsync applies a fresh reply when it arrives
        assert rounds[r["applied_in"]]["time"] == float(r["time"])
    for r in converted:  # a converted one after the conversion's measured CPU time (> 0.1 s)
        assert rounds[r["applied_in"]]["time"] > float(r["time"]) + 0.1
    # conversions queue on the one server core: those still running at the end are discarded
    assert any(r["reason"] == "stale conversion still running at the end" for r in rows)
    times = [rounds[str(v)]["time"] for v in range(1, 7)]
    assert times == sorted(times)
    evals = res["evaluate_metrics_serverapp"]
    assert evals["6"]["accuracy"] > evals["0"]["accuracy"]
