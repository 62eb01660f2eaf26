"""A Flower Simulation Engine run on a Ray cluster of two raylets on loopback.

For users who outgrow one machine: ``ray start --head`` on one host, ``ray start --address=...``
on the others, then ``ray.init(address=...)`` in the driver before ``flwr_ext.sim.run_app``:
Flower's Ray backend uses an initialised Ray as it is (docs/asyncfl.md, "Scale"). Here both
raylets run on this machine, on 127.0.0.1, in a temporary directory of their own; the test
stops exactly the processes of that cluster, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "bench" / "apps" / "light-async"
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(temp_dir: str) -> list[int]:
    """PIDs of the processes of the cluster whose session lives under ``temp_dir``."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.Error, TypeError):
            continue
        if temp_dir in cmd:
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.slow
def test_simulation_on_a_two_raylet_cluster_on_loopback(tmp_path):
    import ray

    temp_dir = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run(
            [str(RAY), "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
             "--include-dashboard=false", *common],
            check=True, env=env, capture_output=True, timeout=180,
        )  # fmt: skip
        subprocess.run(
            [str(RAY), "start", f"--address=127.0.0.1:{port}", *common],
            check=True, env=env, capture_output=True, timeout=180,
        )  # fmt: skip
        sys.path.insert(0, str(APP))
        # the cluster's workers need the driver's import path, as Flower gives it when it
        # starts Ray itself
        env_vars = {"PYTHONPATH": os.pathsep.join(sys.path)}
        ray.init(
            address=f"127.0.0.1:{port}",
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars},
        )
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2

        from light_async.client_app import app as client_app
        from light_async.server_app import app as server_app

        from flwr_ext.sim import fused_run_config, run_app

        out = tmp_path / "out"
        cfg = fused_run_config(
            APP,
            {"strategy": "fedbuff", "clock": "virtual", "num-server-rounds": 4,
             "buffer-size": 2, "min-train-nodes": 4, "output-dir": str(out)},
        )  # fmt: skip
        t0 = time.perf_counter()
        run_app(server_app, client_app, num_supernodes=4, run_config=cfg)
        wall = time.perf_counter() - t0
        info = json.loads((out / "fedbuff-counters.json").read_text())
        print(f"two-raylet cluster: {info['counters']['versions']:.0f} versions in {wall:.1f} s")
        assert info["stop_reason"] == "num_rounds reached"
        assert info["counters"]["updates-applied"] == 8
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for pid in _cluster_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        time.sleep(2)
        for pid in _cluster_pids(temp_dir):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
