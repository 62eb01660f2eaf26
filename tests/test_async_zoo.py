"""baselines/async-zoo: the sweep helpers, the goal arithmetic, and one quick cell end to end."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flwr_ext.sweep import mean_curve, mean_sd

RUN_PY = Path(__file__).resolve().parents[1] / "baselines" / "async-zoo" / "run.py"


def _zoo():
    spec = importlib.util.spec_from_file_location("async_zoo_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["async_zoo_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_mean_sd_and_mean_curve():
    assert mean_sd([]) == "-"
    assert mean_sd([0.5]) == "0.500"
    assert mean_sd([1.0, 3.0], 1) == "2.0 ± 1.4"  # sample sd: sqrt(2)
    grid = np.array([0.0, 1.0, 2.5])
    # step functions: run A is 0.1 from t=0, 0.5 from t=2; run B starts at t=1
    got = mean_curve([[(0.0, 0.1), (2.0, 0.5)], [(1.0, 0.3)]], grid)
    np.testing.assert_allclose(got, [0.1, 0.2, 0.4])


def _row(t90, final, slow=None, t_end=40.0):
    return {
        "time_to_90": t90,
        "final_accuracy": final,
        "final_slow_accuracy": slow,
        "final_time": t_end,
    }


def test_groups_split_profiles_by_data_keys():
    zoo = _zoo()
    assert zoo.groups(["homogeneous", "intertwined", "skewed"]) == [
        ["homogeneous", "skewed"],
        ["intertwined"],
    ]


def test_goals_by_hand():
    zoo = _zoo()
    agg = {
        "exponential": {
            "fedavg-timed": [_row(30.0, 0.95), _row(34.0, 0.93)],
            "fedbuff": [_row(6.0, 0.96), _row(8.0, 0.94)],
            "fedasync": [_row(5.0, 0.90), _row(None, 0.85)],  # one seed missed 90%: no candidate
        },
        "intertwined": {
            "fedavg-timed": [_row(None, 0.92, slow=0.90, t_end=100.0)] * 2,
            "fedfix": [_row(20.0, 0.93, slow=0.89)] * 2,
            "fedasync": [_row(10.0, 0.90, slow=0.70)] * 2,
        },
    }
    g = zoo.goals(agg)
    a = g["a"]["exponential"]
    assert a["best"] == "fedbuff"
    assert a["ratio"] == pytest.approx(7.0 / 32.0)
    assert a["final_minus_fedavg"] == pytest.approx(0.01)
    b = g["a"]["intertwined"]
    assert b["best"] == "fedasync" and b["fedavg_time_to_90"] is None and b["ratio"] is None
    assert b["ratio_upper_bound"] == pytest.approx(10.0 / 100.0)  # FedAvg missed 90% in 100 s
    assert g["b"]["fedfix"] == pytest.approx(-0.01)
    assert g["b"]["fedasync"] == pytest.approx(-0.20)


def test_quick_cell_end_to_end(tmp_path):
    """One quick cell (homogeneous, seed 0, two strategies) through the real inline backend."""
    zoo = _zoo()
    t0 = time.time()
    argv = ["--quick", "--profiles", "homogeneous", "--seeds", "0", "--out", str(tmp_path)]
    assert zoo.main([*argv, "--variants", "fedavg-timed,fedbuff-ab", "--workers", "0"]) == 0
    wall = time.time() - t0
    md = (tmp_path / "results.md").read_text()
    assert "| homogeneous | FedAvg (timed) |" in md and "| homogeneous | FedBuff + AB |" in md
    res = json.loads((tmp_path / "results.json").read_text())["results"]["homogeneous"]
    for name in ("fedavg-timed", "fedbuff-ab"):
        (row,) = res[name]
        assert row["updates_applied"] > 0 and row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["final_time"] == pytest.approx(4.0)  # 0.2 x the 20 s budget
    assert (tmp_path / "accuracy_vs_time.png").stat().st_size > 0
    assert wall < 60, wall
