"""`flwr-ext run`: a run whose ServerApp raised exits non-zero (Flower 1.42's `flwr run` exits 0).

Real `flwr run` of apps/async-vision with `num-server-rounds=-1` on the local simulation
connection, in a private FLWR_HOME on free ports; the SuperLink it starts is stopped by PID
(`flwr_ext.cli.stop_local_superlink`) whatever happens.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flwr_ext.cli import local_superlink_pids, stop_local_superlink

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not (BIN / "flwr").exists(), reason="flwr CLI not installed")
def test_flwr_ext_run_exits_nonzero_when_the_serverapp_raised(tmp_path) -> None:
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    args = ["run", str(ROOT / "apps" / "async-vision"), "--run-config", "num-server-rounds=-1"]
    try:
        ours = subprocess.run(
            [str(BIN / "flwr-ext"), *args],
            env=env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip
        assert ours.returncode == 1, ours.stdout[-2000:] + ours.stderr[-2000:]
        # "ended ..." is printed only after flwr run itself exited 0: its status says failed
        assert "num-server-rounds = -1 is not allowed" in ours.stdout
        assert "ended finished:failed" in ours.stderr
        assert "num-server-rounds = -1 is not allowed; expected an integer >= 1" in ours.stderr
    finally:
        stop_local_superlink(home)
    assert local_superlink_pids(home) == []
