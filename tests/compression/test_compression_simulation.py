"""Integration: a real Flower simulation (Ray) with ``compression_mod`` and ``Compressed(FedAvg)``.

A tiny self-contained ClientApp trains a one-hidden-layer numpy MLP on scikit-learn's digits
(IID split over 4 SuperNodes). The same run is done uncompressed and with the ``fedzip``
pipeline; one SuperNode additionally corrupts its payload after compression, and the server
must drop exactly its replies and go on.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from digits_mlp import central_accuracy, sgd_epochs, train_reply
from digits_mlp import digits_split as _data
from digits_mlp import forward as _forward
from digits_mlp import init_mlp as _init
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.compression import Compressed, compression_mod

NODES, ROUNDS = 4, 8


def _client_fn(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, NODES, epochs=3)


def _corrupt_mod(msg: Message, context: Context, call_next) -> Message:
    """On node 0, truncate the (already compressed) payloads, as a broken link would."""
    out = call_next(msg, context)
    if int(context.node_config["partition-id"]) == 0 and not out.has_error():
        key = next(iter(out.content.array_records))
        rec = out.content[key]
        out.content[key] = ArrayRecord(
            {
                k: Array(a.dtype, a.shape, a.stype, a.data[: len(a.data) // 2])
                for k, a in rec.items()
            }
        )
    return out


strategy_errors: list[str] = []


class _ErrorRecordingFedAvg(FedAvg):
    """Flower's FedAvg, keeping the reasons of the error replies it skips (and logs)."""

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        replies = list(replies)
        strategy_errors.extend(m.error.reason for m in replies if m.has_error())
        return super().aggregate_train(server_round, replies)


def _server_app(compressed: bool, out_file: str) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = _ErrorRecordingFedAvg(
            fraction_evaluate=0.0, min_available_nodes=NODES, min_train_nodes=2
        )
        if compressed:
            strategy = Compressed(strategy)
        init = ArrayRecord({k: Array(v) for k, v in _init().items()})
        result = strategy.start(
            grid, init, num_rounds=ROUNDS, train_config=ConfigRecord(), evaluate_fn=central_accuracy
        )
        summary = {
            "accuracy": result.evaluate_metrics_serverapp[ROUNDS]["accuracy"],
            "train": {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
            "error-reasons": strategy_errors,
        }
        Path(out_file).write_text(json.dumps(summary))

    return app


def _run(compressed: bool, out_file: Path, wrapped: bool | None = None) -> dict:
    """``compressed``: the clients compress; ``wrapped``: the server uses ``Compressed``."""
    from flwr.simulation import run_simulation

    # the first mod is the outermost: _corrupt_mod sees the reply after compression
    mods = [_corrupt_mod, compression_mod("fedzip", density=0.1)] if compressed else []
    client = ClientApp(mods=mods)
    client.train()(_client_fn)
    run_simulation(
        server_app=_server_app(compressed if wrapped is None else wrapped, str(out_file)),
        client_app=client,
        num_supernodes=NODES,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 1, "include_dashboard": False},
        },
    )
    return json.loads(out_file.read_text())


def _reference_fedavg() -> float:
    """The same training without Flower and without compression (in-process FedAvg)."""
    xtr, ytr, xte, yte = _data()
    glob = _init()
    for _ in range(ROUNDS):
        news, sizes = [], []
        for pid in range(NODES):
            p = {k: v.copy() for k, v in glob.items()}
            sgd_epochs(p, xtr[pid::NODES], ytr[pid::NODES], epochs=3)
            news.append(p)
            sizes.append(len(ytr[pid::NODES]))
        w = np.array(sizes, dtype=np.float64) / sum(sizes)
        glob = {
            k: sum(wi * p[k] for wi, p in zip(w, news, strict=True)).astype(np.float32)
            for k in glob
        }
    return float(np.mean(_forward(glob, xte)[1].argmax(1) == yte))


def _check_compressed(comp: dict, reference_accuracy: float) -> None:
    # same accuracy band (node 0's replies are dropped every round in the compressed run)
    assert comp["accuracy"] > reference_accuracy - 0.03, (comp["accuracy"], reference_accuracy)
    last = comp["train"][str(ROUNDS)]
    assert last["dropped-replies"] == 1  # node 0's truncated payload, every round
    assert last["compression-ratio"] > 10
    raw_per_update = sum(v.nbytes for v in _init().values())
    assert last["uplink-bytes-per-update"] < raw_per_update / 10
    assert last["uplink-bytes-cumulative"] > ROUNDS * 3 * last["uplink-bytes-per-update"] * 0.9
    assert last["downlink-bytes-cumulative"] >= ROUNDS * NODES * raw_per_update


@pytest.mark.timeout(300)
def test_compressed_simulation_reaches_uncompressed_accuracy_with_fewer_bytes(tmp_path) -> None:
    reference = _reference_fedavg()
    assert reference > 0.9
    _check_compressed(_run(True, tmp_path / "comp.json"), reference)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compressed_vs_uncompressed_simulation(tmp_path) -> None:
    """Both runs through the Simulation Engine (two Ray start-ups: slow on a shared CPU)."""
    plain = _run(False, tmp_path / "plain.json")
    assert plain["accuracy"] > 0.9
    _check_compressed(_run(True, tmp_path / "comp.json"), plain["accuracy"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compressing_clients_and_plain_fedavg_say_what_to_do(tmp_path) -> None:
    """Issue 15.6: compression_mod on the clients, Flower's FedAvg without Compressed.

    Before the handshake the ServerApp died in Flower with "Unsupported serialization type
    'flwr-ext/fedzip'"; now every client answers with the fix as its error reason, FedAvg
    logs and skips those replies, and the run ends normally.
    """
    strategy_errors.clear()
    out = _run(True, tmp_path / "plain-server.json", wrapped=False)
    assert len(out["error-reasons"]) == ROUNDS * NODES
    assert all("wrap the strategy in Compressed" in r for r in out["error-reasons"])
    assert out["train"] == {}  # nothing aggregated: the model stays the initial one
