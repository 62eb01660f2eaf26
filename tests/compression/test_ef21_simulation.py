"""Integration: EF21 through Flower's Simulation Engine (Ray), ``ef21_mod`` + ``EF21`` strategy.

A one-hidden-layer numpy MLP on scikit-learn's digits, 4 SuperNodes (IID split). The run must
train, send about 10x fewer bytes than the dense model, and end with the server's mirror of
every ``g_i`` bit-identical to the ``g_i`` in that SuperNode's ``context.state``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from digits_mlp import central_accuracy, train_reply
from digits_mlp import init_mlp as _init
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from flwr_ext.compression.ef21 import STATE_KEY, EF21ClientState, _load, client_sync, ef21_mod
from flwr_ext.strategies import EF21, EF21BC

NODES, ROUNDS = 4, 10


def _client_fn(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, NODES, epochs=2)


def _dump_mod(out_dir: str):
    """Outermost mod: after ``ef21_mod`` has run, write this node's EF21 state to a file."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        out = call_next(msg, context)
        state = _load(context, STATE_KEY)
        np.savez(
            Path(out_dir) / f"node-{context.node_id}.npz",
            count=state.count,
            **{f"g.{k}": v for k, v in state.g.items()},
            **{f"p.{k}": v for k, v in (state.pending or {}).items()},
        )
        return out

    return mod


def _server_app(out_dir: str, bidirectional: bool) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        kwargs = dict(fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES)
        strategy = EF21BC(downlink_density=0.1, **kwargs) if bidirectional else EF21(**kwargs)
        init = ArrayRecord({k: Array(v) for k, v in _init().items()})
        result = strategy.start(
            grid, init, num_rounds=ROUNDS, train_config=ConfigRecord(), evaluate_fn=central_accuracy
        )
        summary = {
            "accuracy": result.evaluate_metrics_serverapp[ROUNDS]["accuracy"],
            "train": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "accepted": {str(n): c for n, c in strategy.state.accepted.items()},
        }
        Path(out_dir, "server.json").write_text(json.dumps(summary))
        mirrors = {f"{n}.{k}": v for n, m in strategy.state.mirrors.items() for k, v in m.items()}
        np.savez(Path(out_dir) / "mirrors.npz", **mirrors)

    return app


@pytest.mark.slow  # ~16 s each: one Ray start-up
@pytest.mark.timeout(300)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["ef21", "ef21-bc"])
def test_ef21_simulation_trains_with_fewer_bytes_and_consistent_state(
    tmp_path, bidirectional: bool
) -> None:
    from flwr.simulation import run_simulation

    client = ClientApp(mods=[_dump_mod(str(tmp_path)), ef21_mod(density=0.1)])
    client.train()(_client_fn)
    run_simulation(
        server_app=_server_app(str(tmp_path), bidirectional),
        client_app=client,
        num_supernodes=NODES,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 1, "include_dashboard": False},
        },
    )
    summary = json.loads((tmp_path / "server.json").read_text())
    assert summary["accuracy"] > 0.85, summary["accuracy"]
    last = summary["train"][str(ROUNDS)]
    assert last["ef21-accepted"] == NODES and last["ef21-rejected"] == 0
    raw = sum(v.nbytes for v in _init().values())
    assert last["uplink-bytes-per-update"] < raw / 5
    if bidirectional:  # round 1 dense (x and g), then b only
        assert summary["train"]["1"]["ef21-bc-dense"] == NODES
        assert last["ef21-bc-dense"] == 0 and last["downlink-bytes-per-node"] < raw / 5
    # every SuperNode's g_i (after committing its acknowledged last c_i) == the server mirror
    mirrors = np.load(tmp_path / "mirrors.npz")
    assert len(summary["accepted"]) == NODES
    for node, accepted in summary["accepted"].items():
        assert accepted == ROUNDS
        dump = np.load(tmp_path / f"node-{node}.npz")

        state = EF21ClientState(
            g={k[2:]: dump[k] for k in dump.files if k.startswith("g.")},
            count=int(dump["count"]),
            pending={k[2:]: dump[k] for k in dump.files if k.startswith("p.")},
        )
        client_sync(state, accepted)
        assert state.count == ROUNDS
        for name in _init():
            assert np.array_equal(state.g[name], mirrors[f"{node}.{name}"]), (node, name)
