"""``flwr_ext.sim.run_app`` on Flower's Simulation Engine: a failing ServerApp must not end quietly.

Flower 1.42 runs the ServerApp in a thread that catches ``Exception`` only: a ServerApp that calls
``sys.exit(2)`` ends ``run_simulation`` normally. ``run_app`` raises ``ServerAppFailed``. (The
inline backend and plain exceptions: ``tests/test_inline.py``.) One short Ray run.
"""

from __future__ import annotations

import pytest
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_ext.sim import ServerAppFailed, run_app


def test_simulation_engine_serverapp_exit_is_an_error():
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        raise SystemExit(2)

    try:
        with pytest.raises(ServerAppFailed) as info:
            run_app(server, ClientApp(), num_supernodes=1, run_config={})
        assert isinstance(info.value.__cause__, SystemExit)
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
