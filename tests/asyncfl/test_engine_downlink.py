"""EF21-P downlink in the asynchronous engine: per-node shadows, re-syncs, bytes, clock.

The in-process FakeGrid runs each node's ClientApp as ``compression_mod`` (with the node's own
``context.state``) around a trainer, as Flower runs a ClientApp's mods, without Ray.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.engine import AsyncEngine
from flwr_ext.asyncfl.options import EngineOptions
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.compression import Compressed, compression_mod
from flwr_ext.compression.downlink import load_copy
from flwr_ext.strategies import FedAsync, FedBuff

INIT = {
    "w": np.random.default_rng(0).standard_normal((60, 50)).astype(np.float32),
    "b": np.zeros(50, np.float32),
}
DENSE_BYTES = ArrayRecord({k: Array(v) for k, v in INIT.items()}).count_bytes()
NO_LINK = DeviceProfile("normal", mean_step_time=0.1, std=0.05, latency=0.0, up_mbps=1e9)
SLOW_DOWN = DeviceProfile(
    "normal", mean_step_time=0.01, std=0.005, latency=0.0, up_mbps=1e9, down_mbps=0.1
)


def _init() -> ArrayRecord:
    return ArrayRecord({k: Array(v.copy()) for k, v in INIT.items()})


class _Nodes:
    """Each partition's ClientApp: ``compression_mod(uplink)`` around one gradient step.

    ``lose`` / ``fail``: ``(partition, job)`` pairs whose reply is lost after the node applied
    the downlink message (an expired reply, as Flower reports it) / whose training raises.
    """

    def __init__(self, uplink: str = "none", lose=(), fail=()) -> None:
        self.mod = compression_mod(uplink)
        self.ctx: dict[int, Context] = {}
        self.jobs: dict[int, int] = {}
        self.lose, self.fail = set(lose), set(fail)
        self.trained: list[tuple[int, dict, dict]] = []  # (partition, w it got, y it sent)

    def __call__(self, pid: int, msg: Message) -> RecordDict:
        ctx = self.ctx.setdefault(
            pid, Context(run_id=1, node_id=pid, node_config={}, state=RecordDict(), run_config={})
        )
        job = self.jobs.get(pid, 0)
        self.jobs[pid] = job + 1
        target = np.random.default_rng(100 + pid)

        def train(m: Message, c: Context) -> Message:
            x = {k: v.numpy() for k, v in m.content["arrays"].items()}
            if (pid, job) in self.fail:
                raise RuntimeError("training failed")
            t = {k: target.standard_normal(v.shape).astype(v.dtype) for k, v in x.items()}
            new = {k: (x[k] - np.float32(0.3) * (x[k] - t[k])).astype(np.float32) for k in x}
            self.trained.append((pid, x, new))
            metrics = MetricRecord({"num-examples": 10 + pid, "partition-id": pid})
            content = RecordDict(
                {"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}), "metrics": metrics}
            )
            return Message(content, reply_to=m)

        out = self.mod(msg, ctx, train)
        if out.has_error():
            raise RuntimeError(out.error.reason)
        if (pid, job) in self.lose:
            raise _Lost
        return out.content


class _Lost(Exception):
    pass


class _LossyGrid(FakeGrid):
    """FakeGrid: a lost reply (the node applied the message) comes back as "node unavailable"."""

    def pull_messages(self, message_ids):
        sent = {m: self._pending[m] for m in message_ids if m in self._pending}
        replies = []
        for reply in super().pull_messages(message_ids):
            if reply.has_error() and "_Lost" in reply.error.reason:
                orig = sent[reply.metadata.reply_to_message_id]
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "reply lost"), reply_to=orig)
            replies.append(reply)
        return replies


def _engine(strategy, nodes, *, n=5, profile=NO_LINK, timeout=3600.0, **opts):
    grid = _LossyGrid(nodes, n, seed=7, per_pull=1)
    options = EngineOptions(num_rounds=opts.pop("rounds", 40), timeout=timeout, **opts)
    engine = AsyncEngine(strategy, grid, clock=VirtualClock(profile, seed=1), options=options)
    return engine, grid


def _check_shadows(engine: AsyncEngine, grid: FakeGrid, nodes: _Nodes) -> int:
    """Every node's shadow is byte-identical to the engine's (or one message behind)."""
    same = 0
    for nid, pid in grid.partition.items():
        server = engine.downlink.nodes.get(nid)
        copy = load_copy(nodes.ctx[pid].state) if pid in nodes.ctx else None
        if server is None:
            continue
        assert copy is not None
        if copy.version == server.version:
            assert list(copy.arrays) == list(server.arrays)
            for k in server.arrays:
                assert copy.arrays[k].dtype == server.arrays[k].dtype
                assert copy.arrays[k].tobytes() == server.arrays[k].tobytes()
            same += 1
        else:  # its last message is in flight (not run yet) or was lost before applying
            assert server.version > copy.version
    return same


@pytest.mark.parametrize(
    "make",
    [lambda: FedAsync(alpha=0.5), lambda: FedBuff(buffer_size=3)],
    ids=["fedasync", "fedbuff"],
)
@pytest.mark.parametrize("uplink", ["none", "fedzip"])
def test_shadows_identical_and_bytes_small(make, uplink) -> None:
    nodes = _Nodes(uplink)
    engine, grid = _engine(make(), nodes, rounds=40, downlink="fedzip")
    result = engine.run(_init())
    assert engine.version == 40
    assert result.counters["updates-rejected"] == 0 and result.counters["error-replies"] == 0
    assert _check_shadows(engine, grid, nodes) >= 3
    c = result.counters
    assert c["downlink-new"] == 5 and c["downlink-resynced"] == 0
    assert c["downlink-compressed"] == c["jobs-dispatched"] - 5
    rows = result.updates
    assert all(r.bytes_down == DENSE_BYTES for r in rows if r.job == 0)
    later = [r.bytes_down for r in rows if r.job > 0]
    assert later and max(later) * 10 < DENSE_BYTES  # fedzip: 2% top-k, quantized, coded
    assert c["downlink-bytes"] < 0.25 * c["jobs-dispatched"] * DENSE_BYTES
    # the node trained from its shadow, which is not the model version it was sent
    assert any(not np.array_equal(w["w"], INIT["w"]) for _, w, _ in nodes.trained[5:])
    assert max(r.staleness for r in rows if r.accepted) > 0


def test_update_is_relative_to_shadow_and_applied_to_the_model_sent() -> None:
    """The update is y_i - w_i (w_i: the shadow the node trained from), applied at x_v."""
    nodes = _Nodes("none")
    seen: list = []

    class Spy(FedAsync):
        def on_update(self, engine, update):
            seen.append((update.base, {k: v.copy() for k, v in update.delta().items()}))
            super().on_update(engine, update)

    engine, _ = _engine(Spy(alpha=0.5), nodes, n=1, rounds=8, downlink="fedzip")
    result = engine.run(_init())
    assert len(seen) == 8 and len(nodes.trained) >= 8
    x = {k: v.copy() for k, v in INIT.items()}
    for i, ((base, delta), (_, w, y)) in enumerate(zip(seen, nodes.trained, strict=False)):
        for k in x:
            np.testing.assert_array_equal(delta[k], y[k] - w[k])
            # one node: x_v is x_{v-1} + 0.5 ((x_{v-1} + y - w) - x_{v-1}) (FedAsync, s(0) = 1)
            np.testing.assert_allclose(base[k], x[k], rtol=0, atol=1e-6)
            if i:  # after the first (dense) job the shadow lags the model: w_i != x_v
                assert not np.array_equal(w[k], base[k]) or k == "b"
        x = {k: base[k] + np.float32(0.5) * delta[k] for k in base}
    for k in x:
        np.testing.assert_allclose(result.arrays[k].numpy(), x[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make",
    [lambda: FedAsync(alpha=0.5), lambda: FedBuff(buffer_size=3)],
    ids=["fedasync", "fedbuff"],
)
def test_lost_and_error_replies_are_resynced_densely(make) -> None:
    lose = {(1, 3), (2, 5)}
    fail = {(3, 4), (0, 2)}
    nodes = _Nodes("fedzip", lose=lose, fail=fail)
    engine, grid = _engine(make(), nodes, rounds=40, downlink="fedzip")
    result = engine.run(_init())
    c = result.counters
    assert c["downlink-new"] == 5
    assert c["downlink-resynced"] == len(lose) + len(fail)
    assert c["updates-rejected"] == 0
    assert _check_shadows(engine, grid, nodes) >= 3
    for pid, job in lose | fail:  # the next job of that node was dense
        nid = next(n for n, p in grid.partition.items() if p == pid)
        (row,) = [r for r in result.updates if r.node == pid and r.job == job + 1]
        assert row.bytes_down == DENSE_BYTES, (pid, job, nid)
        (bad,) = [r for r in result.updates if r.node == pid and r.job == job]
        assert not bad.accepted


def test_virtual_clock_download_time_follows_the_bytes() -> None:
    """Bandwidth-limited downlink (0.1 Mbit/s): compressed jobs finish much earlier."""

    def run(down):
        engine, _ = _engine(
            FedBuff(buffer_size=2),
            _Nodes("none"),
            profile=SLOW_DOWN,
            rounds=20,
            **({"downlink": down} if down else {}),
        )
        return engine.run(_init())

    dense, comp = run(None), run("fedzip")
    assert "downlink-bytes" not in dense.counters
    t_dense = [r.time for r in dense.updates if r.accepted]
    t_comp = [r.time for r in comp.updates if r.accepted]
    assert t_comp[-1] < 0.5 * t_dense[-1]
    for r in comp.updates:  # download time is the bytes over the link (no latency)
        assert r.duration >= 8.0 * r.bytes_down / 0.1e6 - 1e-9


def test_compressed_wrapper_hands_downlink_to_the_engine() -> None:
    from flwr_ext.compression.errors import ConfigError

    wrapped = Compressed(FedBuff(buffer_size=3), downlink="fedzip")
    assert wrapped.downlink is None and wrapped.engine_options["downlink"].density == 0.02
    nodes = _Nodes("fedzip")
    result = wrapped.start(
        FakeGrid(nodes, 4, seed=3, per_pull=1),
        _init(),
        num_rounds=10,
        clock=VirtualClock(NO_LINK, seed=1),
        poll_interval=0,
    )
    assert result.counters["downlink-compressed"] > 0
    assert result.counters["updates-rejected"] == 0
    with pytest.raises(ConfigError):
        Compressed(FedBuff(), downlink="fedzip", downlink_initial="known")


def test_reply_without_the_mod_is_rejected() -> None:
    from .helpers import shift_client

    engine, _ = _engine(
        FedBuff(buffer_size=2), shift_client, rounds=2, max_failures=1, downlink="fedzip"
    )
    result = engine.run(_init())
    assert engine.version == 0
    assert any("compression_mod" in k for k in result.reasons)


class _CrashingGrid(_LossyGrid):
    def __init__(self, *args, crash_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    def push_messages(self, messages):
        messages = list(messages)
        if self.pushed + len(messages) >= self.crash_at:
            raise RuntimeError("simulated ServerApp crash")
        return super().push_messages(messages)


def test_resume_sends_every_node_the_dense_model_once(tmp_path) -> None:
    """Shadows are not checkpointed: after a resume each node is new (dense), then compressed."""
    nodes = _Nodes("fedzip")
    ckpt = tmp_path / "ckpt"
    options = EngineOptions(
        num_rounds=30, checkpoint_dir=str(ckpt), checkpoint_every=2, downlink="fedzip"
    )
    grid = _CrashingGrid(nodes, 5, seed=7, per_pull=1, crash_at=40)
    with pytest.raises(RuntimeError, match="crash"):
        AsyncEngine(
            FedBuff(buffer_size=3), grid, clock=VirtualClock(NO_LINK, 1), options=options
        ).run(_init())
    # same nodes (their context.state survives), new node ids
    grid2 = _LossyGrid(nodes, 5, seed=11, per_pull=1)
    grid2.partition = {nid: pid for nid, pid in zip(grid2.node_ids, range(5), strict=True)}
    options2 = EngineOptions(num_rounds=30, resume_from=str(ckpt), downlink="fedzip")
    engine = AsyncEngine(
        FedBuff(buffer_size=3), grid2, clock=VirtualClock(NO_LINK, 1), options=options2
    )
    result = engine.run(_init())
    c = result.counters
    assert engine.version == 30 and c["resumes"] == 1
    assert c["updates-rejected"] == 0 and c["error-replies"] == 0
    assert c["downlink-new"] == 5 + 5  # before the crash, and again after the resume
    assert c["downlink-resynced"] == 0
    assert _check_shadows(engine, grid2, nodes) >= 3
