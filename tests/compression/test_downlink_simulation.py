"""Integration: EF21-P downlink through Flower's Simulation Engine (``flwr_ext.sim.run_app``).

``Compressed(FedAvg, downlink="fedzip")`` on the server, ``compression_mod`` (uplink preset
from the run config) on 4 SuperNodes training a numpy MLP on scikit-learn's digits. One node
loses its ``context.state`` in round 4. The run must train, send far fewer bytes than the dense
model both ways after the first round, re-sync exactly the node that lost its state, and end
with every SuperNode's shadow bit-identical to the server's copy.
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
from flwr.serverapp.strategy import FedAvg

from flwr_ext.compression import Compressed, compression_mod
from flwr_ext.compression.downlink import STATE_KEY, load_copy

NODES, ROUNDS, LOSE_ROUND, LOSE_PID = 4, 8, 4, 1


def _client_fn(msg: Message, context: Context) -> Message:
    """A plain ClientApp written for Flower's FedAvg: trains what it receives."""
    return train_reply(msg, context, NODES, epochs=2)


def _outer_mod(out_dir: str):
    """Outermost mod: drops one node's state once (before), dumps its shadow (after)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        rnd = int(msg.content["config"]["server-round"])
        if rnd == LOSE_ROUND and int(context.node_config["partition-id"]) == LOSE_PID:
            for key in [k for k in context.state if k.startswith(STATE_KEY)]:
                del context.state[key]
        out = call_next(msg, context)
        copy = load_copy(context.state)
        np.savez(
            Path(out_dir) / f"node-{context.node_id}.npz",
            version=copy.version,
            **{f"w.{k}": v for k, v in copy.arrays.items()},
        )
        return out

    return mod


def _server_app(out_dir: str) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Compressed(
            FedAvg(fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=NODES),
            downlink=str(context.run_config["compression-down"]),
        )
        init = ArrayRecord({k: Array(v) for k, v in _init().items()})
        result = strategy.start(
            grid, init, num_rounds=ROUNDS, train_config=ConfigRecord(), evaluate_fn=central_accuracy
        )
        summary = {
            "accuracy": result.evaluate_metrics_serverapp[ROUNDS]["accuracy"],
            "train": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "versions": {str(n): s.version for n, s in strategy.downlink.nodes.items()},
        }
        Path(out_dir, "server.json").write_text(json.dumps(summary))
        shadows = {
            f"{n}.{k}": v for n, s in strategy.downlink.nodes.items() for k, v in s.arrays.items()
        }
        np.savez(Path(out_dir) / "shadows.npz", **shadows)

    return app


@pytest.mark.timeout(300)  # ~14 s (one Ray start-up; 17 s wall on the shared 2-core machine)
def test_downlink_simulation_trains_resyncs_and_keeps_shadows_identical(tmp_path) -> None:
    from flwr_ext.sim import run_app

    client = ClientApp(mods=[_outer_mod(str(tmp_path)), compression_mod(None)])
    client.train()(_client_fn)
    run_app(
        _server_app(str(tmp_path)),
        client,
        num_supernodes=NODES,
        run_config={"compression": "fedzip", "compression-down": "fedzip"},
    )
    summary = json.loads((tmp_path / "server.json").read_text())
    train = summary["train"]
    assert summary["accuracy"] > 0.85, summary["accuracy"]
    raw = ArrayRecord({k: Array(v) for k, v in _init().items()}).count_bytes()
    assert train["1"]["downlink-new"] == NODES  # first contact: the dense model
    # the node that lost its state refuses the increment of LOSE_ROUND (error reply) and is
    # re-synced densely in the next round; nobody else ever is
    assert train[str(LOSE_ROUND)]["downlink-compressed"] == NODES
    assert train[str(LOSE_ROUND + 1)]["downlink-resynced"] == 1
    resynced = sum(m["downlink-resynced"] for m in train.values())
    assert resynced == 1
    for r in range(2, ROUNDS + 1):
        if r != LOSE_ROUND + 1:
            assert train[str(r)]["downlink-bytes-per-node"] < raw / 10, (r, train[str(r)])
        assert train[str(r)]["uplink-bytes-per-update"] < raw / 10
    # every SuperNode's shadow == the server's copy, byte for byte, at the same version
    shadows = np.load(tmp_path / "shadows.npz")
    assert len(summary["versions"]) == NODES
    for node, version in summary["versions"].items():
        dump = np.load(tmp_path / f"node-{node}.npz")
        assert int(dump["version"]) == version
        for name in _init():
            assert dump[f"w.{name}"].tobytes() == shadows[f"{node}.{name}"].tobytes(), name
