"""Compressed replies through the asynchronous engine (decoded once by the intake).

The engine must decode each reply against the model version *that node* was sent (not the
current one), drop and count a corrupt payload, record the bytes really received per update,
and, with the virtual clock, charge the upload time of the compressed bytes.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.compression import compression_mod
from flwr_ext.compression.accounting import write_update_bytes
from flwr_ext.strategies import FedAsync, FedBuff

from .helpers import random_client

SHAPE = (40, 50)
# slow uplink, instant compute: upload time dominates the job duration
PROFILE = DeviceProfile("homogeneous", mean_step_time=0.001, latency=0.0, up_mbps=0.1)
# heterogeneous compute, negligible transfer: the event order does not depend on reply sizes
NO_LINK = DeviceProfile("normal", mean_step_time=0.1, std=0.05, latency=0.0, up_mbps=1e9)


def _init() -> ArrayRecord:
    rng = np.random.default_rng(0)
    return ArrayRecord(
        {
            "w": Array(rng.standard_normal(SHAPE).astype(np.float32)),
            "b": Array(np.zeros(7, np.float32)),
        }
    )


class _Clients:
    """Per-partition ClientApp state (``Context``) around ``random_client`` and a mod."""

    def __init__(self, preset: str | None, corrupt_pid: int | None = None, **overrides) -> None:
        self.mod = compression_mod(preset, **overrides) if preset else None
        self.contexts: dict[int, Context] = {}
        self.corrupt_pid = corrupt_pid
        self.run_config = {"compression": "fedzip"}

    def __call__(self, pid: int, msg: Message) -> RecordDict:
        ctx = self.contexts.setdefault(
            pid,
            Context(
                run_id=1,
                node_id=pid + 1,
                node_config={},
                state=RecordDict(),
                run_config=self.run_config,
            ),
        )

        def train(m: Message, c: Context) -> Message:
            return Message(random_client(pid, m), reply_to=m)

        out = self.mod(msg, ctx, train) if self.mod else train(msg, ctx)
        content = out.content
        if pid == self.corrupt_pid:
            arr = content["arrays"]["w"]
            content["arrays"]["w"] = Array(arr.dtype, arr.shape, arr.stype, arr.data[:-5])
        return content


def _run(clients, strategy, rounds=12, nodes=4, profile=PROFILE, **kw):
    return strategy.start(
        FakeGrid(clients, nodes, seed=7, per_pull=1),
        _init(),
        num_rounds=rounds,
        clock=VirtualClock(profile, seed=1),
        poll_interval=0,
        **kw,
    )


@pytest.mark.parametrize("make", [lambda: FedAsync(alpha=0.5), lambda: FedBuff(buffer_size=2)])
def test_lossless_compressed_equals_uncompressed_with_per_node_reference(make) -> None:
    """A lossless pipeline gives the uncompressed model exactly, with stale updates present.

    Decoding against the *current* model instead of the version the node trained on would
    add the wrong base for every stale update and change the result.
    """
    plain = _run(_Clients(None), make(), profile=NO_LINK)
    lossless = dict(include=("w", "b"), density=1.0)  # sparse-lora at 100%: exact values
    comp = _run(_Clients("sparse-lora", **lossless), make(), profile=NO_LINK)
    assert max(r.staleness for r in comp.updates) > 0
    assert [r.staleness for r in comp.updates] == [r.staleness for r in plain.updates]
    for k in ("w", "b"):
        np.testing.assert_allclose(comp.arrays[k].numpy(), plain.arrays[k].numpy(), atol=1e-5)
    assert comp.counters["updates-rejected"] == 0


def test_corrupt_payload_skipped_counted_and_bytes_recorded(tmp_path) -> None:
    res = _run(_Clients("fedzip", corrupt_pid=2), FedAsync(alpha=0.5), rounds=10, max_failures=3)
    rejected = [r for r in res.finished if not r.accepted]
    assert rejected and all(r.node == 2 for r in rejected)
    assert all(r.reason.startswith("corrupt payload") for r in rejected)
    assert res.reasons.get("corrupt payload") == len(rejected)
    assert res.counters["updates-rejected"] == len(rejected)
    assert res.counters["nodes-retired"] == 1  # 3 corrupt replies in a row
    assert res.counters["updates-applied"] == 10
    assert np.all(np.isfinite(res.arrays["w"].numpy()))
    # bytes per update are those received (compressed), for dropped replies too
    raw = _init().count_bytes()
    assert all(0 < r.bytes_up < raw / 20 for r in res.finished)
    assert all(r.bytes_up == 0 for r in res.updates if r not in res.finished)  # no reply
    path = write_update_bytes(res.updates, tmp_path / "bytes.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(res.updates)
    cum = np.cumsum([r.bytes_up for r in res.updates])
    assert [int(row["uplink_cumulative"]) for row in rows] == cum.tolist()
    assert int(rows[-1]["downlink_cumulative"]) == sum(r.bytes_down for r in res.updates)


def test_virtual_upload_time_follows_compressed_bytes() -> None:
    plain = _run(_Clients(None), FedAsync(alpha=0.5), rounds=8)
    comp = _run(_Clients("fedzip"), FedAsync(alpha=0.5), rounds=8)
    up_bps = PROFILE.up_mbps * 1e6
    for res in (plain, comp):
        for r in res.finished:
            # duration = download + compute + upload; only the upload depends on bytes_up
            down = 8.0 * r.bytes_down / (PROFILE.down_mbps * 1e6)
            rest = r.duration - down - 8.0 * r.bytes_up / up_bps
            steps = PROFILE.default_steps  # random_client reports no num-steps
            assert rest == pytest.approx(steps * PROFILE.mean_step_time, abs=1e-6)
    mean_up = np.mean([r.bytes_up for r in comp.finished])
    assert mean_up < np.mean([r.bytes_up for r in plain.finished]) / 20
    # the same number of updates takes far less virtual time when replies are compressed
    assert comp.finished[-1].time < plain.finished[-1].time / 5


def test_mod_reads_preset_from_run_config_per_message() -> None:
    clients = _Clients(None)
    clients.mod = compression_mod(None)
    res = _run(clients, FedAsync(alpha=0.5), rounds=4)
    assert all(r.accepted for r in res.finished)
    first = res.updates[0].bytes_up
    clients.run_config["compression"] = "none"
    res2 = _run(clients, FedAsync(alpha=0.5), rounds=4)
    assert res2.updates[0].bytes_up > 20 * first


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_async_vision_simulation_with_compression(tmp_path) -> None:
    """A real Flower simulation (Ray) of apps/async-vision: FedAsync on the virtual clock with
    ``compression = "fedzip:density=0.2"`` from the run config (mod on the ClientApp, engine
    decodes). 20%, not the preset's 2%: with 2% FedAsync did not learn in 12 updates here
    (0.16 -> 0.15 accuracy; error feedback delivers the rest later), and a longer run does not
    fit a test (about 100 s for 12 updates on a shared 2-core machine)."""
    from pathlib import Path

    from async_vision.client_app import app as client_app
    from async_vision.server_app import app as server_app

    from flwr_ext.results import load_result
    from flwr_ext.sim import fused_run_config, run_app
    from flwr_ext.vision import DigitsCNN

    app_dir = Path(__file__).resolve().parents[2] / "apps" / "async-vision"
    cfg = fused_run_config(
        app_dir,
        {
            "strategy": "fedasync",
            "compression": "fedzip:density=0.2",
            "output-dir": str(tmp_path),
            "num-server-rounds": 12,
            "local-steps": 8,
            "min-train-nodes": 3,
            "seed": 2,
        },
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg, num_cpus_per_client=1)
    with (tmp_path / "fedasync-updates.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    raw = ArrayRecord(DigitsCNN().state_dict()).count_bytes()
    accepted = [r for r in rows if r["accepted"] == "True"]
    assert len(accepted) >= 12
    assert all(int(r["bytes_up"]) < raw / 8 for r in rows)  # 20% of values at ~2 bits + gaps
    with (tmp_path / "fedasync-bytes.csv").open() as fh:
        cum = [int(r["uplink_cumulative"]) for r in csv.DictReader(fh)]
    assert cum == np.cumsum([int(r["bytes_up"]) for r in rows]).tolist()
    evals = load_result(tmp_path / "fedasync.json")["evaluate_metrics_serverapp"]
    first, last = evals["0"]["accuracy"], evals[max(evals, key=int)]["accuracy"]
    assert last > first + 0.15, (first, last)
