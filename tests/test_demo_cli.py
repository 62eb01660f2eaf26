"""``demo.summarize`` (the README's headline table) and the ``flwr-ext`` command, on tiny inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MetricRecord
from flwr.serverapp.strategy import Result

from flwr_ext import cli, demo
from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.results import save_result
from flwr_ext.strategies import FedAsync

sys.path.insert(0, str(Path(__file__).parent))
from asyncfl.helpers import init_arrays, shift_client  # noqa: E402


def _write(out: Path, name: str, evals: dict[int, dict], counters: dict) -> None:
    res = Result()
    res.evaluate_metrics_serverapp = {v: MetricRecord(m) for v, m in evals.items()}
    save_result(res, out, name=name)
    info = {"counters": counters, "reasons": {}, "stop_reason": "max_time reached"}
    (out / f"{name}-counters.json").write_text(json.dumps(info))


COUNTERS = {
    "mean-staleness": 1.25,
    "updates-applied": 7.0,
    "versions": 4.0,
    "jobs-dispatched": 10.0,
    "updates-rejected": 1.0,
    "error-replies": 2.0,
    "final-time": 5.5,
}
# model versions evaluated at virtual times; accuracy crosses 0.5, dips, peaks, then falls
EVALS = {
    0: {"time": 0.0, "accuracy": 0.1},
    2: {"time": 3.0, "accuracy": 0.45},
    1: {"time": 1.5, "accuracy": 0.55},
    3: {"time": 4.0, "accuracy": 0.7},
    4: {"time": 5.0, "accuracy": 0.6},
}


def test_summarize_reads_time_to_target_and_staleness(tmp_path):
    _write(tmp_path, "fedasync", EVALS, COUNTERS)
    row = demo.summarize(tmp_path, "fedasync", target=0.5)
    assert row["strategy"] == "fedasync"
    assert row["time_to_target"] == 1.5  # the first time it is reached, not the best
    assert row["final_accuracy"] == 0.6 and row["best_accuracy"] == 0.7
    assert row["mean_staleness"] == 1.25
    assert row["updates_applied"] == 7 and row["server_versions"] == 4 and row["jobs"] == 10
    assert row["rejected"] == 3  # rejected updates + error replies
    assert row["final_time"] == 5.5
    assert row["curve"] == [(0.0, 0.1), (1.5, 0.55), (3.0, 0.45), (4.0, 0.7), (5.0, 0.6)]
    assert demo.summarize(tmp_path, "fedasync", target=0.65)["time_to_target"] == 4.0
    assert demo.summarize(tmp_path, "fedasync", target=0.9)["time_to_target"] is None


def test_summarize_matches_an_engine_run(tmp_path):
    """The keys summarize reads are the ones the engine writes (as the async-vision app saves)."""

    def evaluate_fn(version, arrays):
        return MetricRecord({"accuracy": float(min(1.0, arrays["w"].numpy().mean() / 4.0))})

    prof = DeviceProfile("exponential", mean_step_time=0.1, jitter=0.2)
    res = FedAsync(alpha=0.5).start(
        FakeGrid(shift_client, 3, seed=1),
        init_arrays(),
        num_rounds=12,
        clock=VirtualClock(prof, seed=3),
        poll_interval=0,
        evaluate_fn=evaluate_fn,
    )
    _write(
        tmp_path,
        "fedasync",
        {v: dict(m) for v, m in res.evaluate_metrics_serverapp.items()},
        res.counters,
    )
    row = demo.summarize(tmp_path, "fedasync", target=0.5)
    applied = [r.staleness for r in res.updates if r.applied_in >= 0]
    assert len(applied) == 12 and row["updates_applied"] == 12
    assert row["mean_staleness"] == pytest.approx(np.mean(applied))
    assert row["mean_staleness"] > 0  # three nodes: some updates are stale
    first = min(
        float(m["time"])
        for m in res.evaluate_metrics_serverapp.values()
        if float(m["accuracy"]) >= 0.5
    )
    assert row["time_to_target"] == pytest.approx(first) and 0 < first < row["final_time"]


def test_cli_report_prints_each_result(tmp_path, capsys):
    _write(tmp_path, "a", EVALS, COUNTERS)
    _write(tmp_path, "b", {}, COUNTERS)
    assert cli.main(["report", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{tmp_path / 'a.json'}: 5 evaluations, last: ")
    assert "'accuracy': 0.6" in out[0] and "'time': 5.0" in out[0]  # version 4, the last
    assert out[1] == f"{tmp_path / 'b.json'}: 0 evaluations, last: {{}}"


def test_cli_bench_runs_matching_scripts_only(tmp_path, capsys):
    for name in ("bench_alpha.py", "bench_beta.py"):
        (tmp_path / name).write_text(
            "import pathlib\n"
            f"pathlib.Path({str(tmp_path)!r}, {name!r} + '.ran').write_text(__name__)\n"
        )
    assert cli.main(["bench", "--dir", str(tmp_path), "--only", "beta"]) == 0
    assert not (tmp_path / "bench_alpha.py.ran").exists()
    assert (tmp_path / "bench_beta.py.ran").read_text() == "__main__"
    assert "=== bench_beta.py ===" in capsys.readouterr().out
    assert cli.main(["bench", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "bench_alpha.py.ran").exists()
    assert cli.main(["bench", "--dir", str(tmp_path / "none")]) == 2


def test_cli_demo_passes_its_options(monkeypatch):
    calls = []
    monkeypatch.setattr(
        demo, "run_demo", lambda out_dir, quick, **_: calls.append((out_dir, quick))
    )
    assert cli.main(["demo", "--quick", "--out", "x/y"]) == 0
    assert cli.main(["demo"]) == 0
    assert calls == [(Path("x/y"), True), (Path("outputs/demo"), False)]
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def test_console_script_runs(tmp_path):
    _write(tmp_path, "a", EVALS, COUNTERS)
    exe = Path(sys.executable).with_name("flwr-ext")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flwr_ext.cli"]
    out = subprocess.run(
        [*cmd, "report", str(tmp_path / "a.json")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "5 evaluations" in out.stdout
