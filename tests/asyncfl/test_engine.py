"""The engine and the strategies on an in-process Grid: exact maths, ordering, failures."""

from __future__ import annotations

import csv
import math
import time

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Message, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from flwr_ext.asyncfl import AsyncStrategy, DeviceProfile, RealClock, VirtualClock
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.staleness import constant, polynomial
from flwr_ext.strategies import FedAsync, FedAvgTimed, FedBuff, build_strategy
from flwr_ext.strategies.factory import build_start_kwargs

from .helpers import init_arrays, random_client, shift_client

HOMOG = DeviceProfile("homogeneous", mean_step_time=0.1, latency=0.0)


def vclock(profile=HOMOG, seed=0):
    return VirtualClock(profile, seed=seed)


def w(result):
    return result.arrays["w"].numpy()


def test_fedasync_steps_by_hand():
    grid = FakeGrid(shift_client, 2, seed=3)
    res = FedAsync(alpha=0.6, staleness=polynomial(0.5)).start(
        grid, init_arrays(), num_rounds=2, clock=vclock(), poll_interval=0
    )
    # update 1: node 0 (tie broken by key), staleness 0: x1 = 0.4 * 0 + 0.6 * (0 + 1)
    x1 = 0.6
    # update 2: node 1 trained on version 0 (staleness 1), a_t = 0.6 * 2^-0.5
    a2 = 0.6 * 2**-0.5
    x2 = (1 - a2) * x1 + a2 * (0 + 2)
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-6)
    m = res.train_metrics_clientapp
    assert list(m[1]["staleness"]) == [0] and list(m[2]["staleness"]) == [1]
    assert m[2]["alpha-t"] == pytest.approx(a2)
    assert [r.staleness for r in res.finished] == [0, 1]
    assert [r.reason for r in res.updates[2:]] == ["in flight at the end"]


def test_fedbuff_flushes_by_hand():
    grid = FakeGrid(shift_client, 3, seed=5)
    res = FedBuff(buffer_size=3, server_lr=0.5, staleness=polynomial(0.5)).start(
        grid, init_arrays(), num_rounds=2, clock=vclock(), poll_interval=0
    )
    # flush 1 at t=T: deltas 1, 2, 3 all fresh -> x1 = 0.5 * mean = 1.0
    x1 = 0.5 * (1 + 2 + 3) / 3
    # nodes 0 and 1 were re-sent version 0 (before the flush), node 2 version 1:
    # flush 2 at 2T: staleness 1, 1, 0
    s = 2**-0.5
    x2 = x1 + 0.5 * (s * 1 + s * 2 + 1 * 3) / 3
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-6)
    assert list(res.train_metrics_clientapp[2]["staleness"]) == [1, 1, 0]


def test_fedbuff_momentum_flushes_by_hand():
    """Server momentum is applied, not only kept: ``m <- beta m + step; x <- x + lr m``."""
    grid = FakeGrid(shift_client, 3, seed=5)
    res = FedBuff(
        buffer_size=3, server_lr=0.5, staleness=polynomial(0.5), server_momentum=0.9
    ).start(grid, init_arrays(), num_rounds=2, clock=vclock(), poll_interval=0)
    # flush 1: m1 = mean(1, 2, 3) = 2, x1 = 0.5 * m1 (momentum starts from the first step)
    m1 = (1 + 2 + 3) / 3
    x1 = 0.5 * m1
    # flush 2: staleness 1, 1, 0 as in test_fedbuff_flushes_by_hand
    s = 2**-0.5
    m2 = (s * 1 + s * 2 + 1 * 3) / 3 + 0.9 * m1
    x2 = x1 + 0.5 * m2
    np.testing.assert_allclose(w(res), np.full((3, 4), x2), rtol=1e-6)
    np.testing.assert_allclose(res.arrays["b"].numpy(), np.full(2, x2), rtol=1e-6)
    assert list(res.train_metrics_clientapp[2]["staleness"]) == [1, 1, 0]


def test_fedbuff_with_k_all_equals_fedavg_aggregate():
    n = 4
    grid = FakeGrid(random_client, n, seed=1)
    fedbuff = FedBuff(
        buffer_size=n, server_lr=1.0, staleness=constant(), weighted_by_key="num-examples"
    )
    res = fedbuff.start(grid, init_arrays(), num_rounds=1, clock=vclock(), poll_interval=0)
    # the same replies, aggregated by Flower's FedAvg code
    msg = Message(
        RecordDict({"arrays": init_arrays(), "config": ConfigRecord({"server-round": 0})}),
        dst_node_id=1,
        message_type="train",
    )
    replies = [random_client(pid, msg) for pid in range(n)]
    expected = aggregate_arrayrecords(replies, "num-examples")
    for k in ("w", "b"):
        np.testing.assert_allclose(res.arrays[k].numpy(), expected[k].numpy(), rtol=1e-5)
    timed = FedAvgTimed(min_train_nodes=n).start(
        FakeGrid(random_client, n, seed=2), init_arrays(), num_rounds=1, clock=vclock()
    )
    for k in ("w", "b"):
        np.testing.assert_allclose(timed.arrays[k].numpy(), expected[k].numpy(), rtol=1e-5)


def _fingerprint(res):
    recs = [(r.time, r.node, r.job, r.version_sent, r.staleness, r.applied_in) for r in res.updates]
    evals = {v: dict(m) for v, m in res.train_metrics_clientapp.items()}
    for m in evals.values():
        m.pop("wall-time")
    return recs, evals, w(res).tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAsync(alpha=0.5),
        lambda: FedBuff(buffer_size=3),
        lambda: FedAvgTimed(
            fraction_train=1.0, seed=4
        ),  # sampling < 1 keys round 1 by node-id rank
    ],
)
def test_virtual_order_independent_of_reply_order_and_node_ids(make):
    prof = DeviceProfile("exponential", mean_step_time=0.1, jitter=0.2)
    runs = []
    for grid_seed, per_pull in [(0, 0), (1, 1), (2, 3)]:
        grid = FakeGrid(random_client, 6, seed=grid_seed, per_pull=per_pull)
        res = make().start(
            grid, init_arrays(), num_rounds=12, clock=vclock(prof, 7), poll_interval=0
        )
        runs.append(_fingerprint(res))
    assert runs[0] == runs[1] == runs[2]
    # a different profile seed changes the schedule
    other = make().start(
        FakeGrid(random_client, 6),
        init_arrays(),
        num_rounds=12,
        clock=vclock(prof, 8),
        poll_interval=0,
    )
    assert _fingerprint(other)[0] != runs[0][0]


def test_events_in_virtual_time_order_and_staleness_recorded():
    prof = DeviceProfile("lognormal", mean_step_time=0.1, std=1.0, jitter=0.1)
    res = FedAsync().start(
        FakeGrid(random_client, 8, per_pull=1),
        init_arrays(),
        num_rounds=30,
        clock=vclock(prof, 3),
        poll_interval=0,
    )
    times = [r.time for r in res.updates]
    assert times == sorted(times)
    assert all(r.staleness == r.server_version - r.version_sent for r in res.updates)
    assert max(r.staleness for r in res.updates) > 0
    assert res.counters["updates-applied"] == 30


_CALLS: dict[int, int] = {}


def _bad_client(pid: int, msg: Message) -> RecordDict:
    _CALLS[pid] = _CALLS.get(pid, 0) + 1
    if pid == 1 and _CALLS[pid] % 2 == 0:  # every other job: never 3 failures in a row
        raise RuntimeError("boom")
    reply = random_client(pid, msg)
    if pid == 2:
        arr = reply["arrays"]["w"].numpy().copy()
        arr[0, 0] = np.nan
        reply["arrays"]["w"] = Array(arr)
    if pid == 3:
        reply["arrays"]["w"] = Array(np.zeros((2, 2), np.float32))
    if pid == 4:
        reply["arrays"]["extra"] = Array(np.zeros(1, np.float32))
    return reply


def test_bad_replies_counted_not_aggregated_and_nodes_retired():
    res = FedAsync().start(
        FakeGrid(_bad_client, 6, per_pull=2),
        init_arrays(),
        num_rounds=15,
        clock=vclock(),
        poll_interval=0,
        max_failures=3,
    )
    assert np.all(np.isfinite(w(res)))
    rej = [r for r in res.updates if not r.accepted]
    assert {r.node for r in rej} >= {2, 3, 4}
    assert all(r.applied_in == -1 for r in rej)
    assert res.counters["updates-rejected"] >= 9  # 3 nodes x 3 failures before retirement
    assert res.counters["error-replies"] >= 2
    assert res.counters["nodes-retired"] == 3
    assert any("non-finite" in k for k in res.reasons)
    assert any("wrong shape" in k for k in res.reasons)
    assert any("wrong keys" in k for k in res.reasons)
    assert any("ClientApp raised" in k for k in res.reasons)
    assert res.counters["updates-applied"] == 15
    applied_nodes = {r.node for r in res.updates if r.applied_in > 0}
    assert applied_nodes <= {0, 1, 5}


class _NeverAnswers(FakeGrid):
    def pull_messages(self, message_ids):
        silent = {
            m
            for m in message_ids
            if self._pending.get(m) is not None
            and self.partition[self._pending[m].metadata.dst_node_id] == 0
        }
        return super().pull_messages([m for m in message_ids if m not in silent])


def _slow_client(pid, msg):
    time.sleep(0.004)
    return random_client(pid, msg)


def test_job_timeout_retires_silent_node():
    grid = _NeverAnswers(_slow_client, 3)
    res = FedAsync().start(
        grid,
        init_arrays(),
        num_rounds=60,
        timeout=0.05,
        clock=RealClock(),
        poll_interval=0.005,
        max_failures=2,
    )
    assert res.counters["job-timeouts"] == 2
    assert res.counters["nodes-retired"] == 1
    assert res.counters["updates-applied"] == 60


def test_new_nodes_discovered_and_vanished_retired():
    calls = {"n": 0}
    grid = None

    def client(pid, msg):
        calls["n"] += 1
        if calls["n"] == 5:
            grid.add_node()
        if calls["n"] == 10:
            grid.remove_node(grid.node_ids[0])
        return random_client(pid, msg)

    grid = FakeGrid(client, 3, per_pull=1)
    res = FedAsync().start(
        grid, init_arrays(), num_rounds=30, clock=vclock(), poll_interval=0, node_poll_interval=0.0
    )
    assert res.counters["nodes-discovered"] == 4
    assert res.counters["nodes-retired"] == 1
    assert 3 in {r.node for r in res.updates}
    assert res.counters["updates-applied"] == 30


class _TimerProbe(AsyncStrategy):
    """Records the order of updates and timers; sets a deadline at 1.5 x the step."""

    def __init__(self):
        super().__init__()
        self.log = []

    def on_update(self, engine, update):
        self.log.append(("update", update.node_key, round(engine.now, 6)))
        if len(self.log) == 1:
            # homogeneous: node 1 finishes at this very time; its completion goes first
            engine.set_timer(engine.now, "deadline")
            engine.set_timer(engine.now * 1.5, "later")
            engine.cancel_timer(engine.set_timer(engine.now * 1.2, "cancelled"))
        engine.commit(update.params, [update])

    def configure_dispatch(self, engine, idle):
        return [(n, {"local-steps": 5}) for n in idle]  # shift_client reports 5 steps

    def on_timer(self, engine, timer):
        self.log.append(("timer", timer.payload, round(engine.now, 6)))


def test_timers_share_the_clock_and_follow_completions_at_same_time():
    prof = DeviceProfile("homogeneous", mean_step_time=0.1, latency=0.0, up_mbps=1e9, down_mbps=1e9)
    probe = _TimerProbe()
    res = probe.start(
        FakeGrid(shift_client, 2, per_pull=1),
        init_arrays(),
        num_rounds=4,
        clock=vclock(prof),
        poll_interval=0,
    )
    assert res.counters["clock-violations"] == 0
    kinds = [(k, p) for k, p, _ in probe.log]
    assert kinds[:3] == [("update", 0), ("update", 1), ("timer", "deadline")]
    assert ("timer", "cancelled") not in kinds
    assert kinds.index(("timer", "later")) == 3  # before the second completions at 2T
    times = [t for *_, t in probe.log]
    assert times == sorted(times)


def test_max_time_and_factory():
    cfg = {
        "strategy": "fedbuff",
        "buffer-size": 2,
        "profile": "exponential",
        "seed": 1,
        "max-time": 2.0,
        "staleness": "hinge",
        "max-staleness": 5,
    }
    strat = build_strategy(cfg)
    kw = build_start_kwargs(cfg)
    assert isinstance(strat, FedBuff) and strat.staleness.kind == "hinge"
    res = strat.start(
        FakeGrid(random_client, 4), init_arrays(), num_rounds=1000, poll_interval=0, **kw
    )
    assert res.stop_reason == "max_time reached"
    assert res.counters["final-time"] <= 2.0
    assert all(r.time <= 2.0 for r in res.updates)
    # lower bounds: the run went on until max_time with every node busy (a run that
    # stops at t = 0, or after the first flush, fails here)
    assert res.counters["final-time"] == pytest.approx(2.0)
    assert res.counters["versions"] >= 3
    assert res.counters["updates-applied"] == 2 * res.counters["versions"]
    assert max(r.time for r in res.finished) > 1.5
    assert [r.reason for r in res.updates if not r.valid] == ["in flight at the end"] * 4
    with pytest.raises(ValueError):
        build_strategy({"strategy": "nope"})


def test_csv_written(tmp_path):
    res = FedAsync().start(
        FakeGrid(random_client, 3),
        init_arrays(),
        num_rounds=5,
        clock=vclock(),
        poll_interval=0,
        csv_path=str(tmp_path / "u.csv"),
    )
    lines = (tmp_path / "u.csv").read_text().splitlines()
    assert lines[0].startswith("time,wall_time,node,")
    assert len(lines) == 1 + len(res.updates)
    assert math.isfinite(res.counters["server-overhead-s"])
    # the content: one row per record, in order, the same values
    with (tmp_path / "u.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(res.updates) >= 5
    for row, rec in zip(rows, res.updates, strict=True):
        assert float(row["time"]) == pytest.approx(rec.time, rel=1e-12)
        assert int(row["node"]) == rec.node and int(row["job"]) == rec.job
        assert int(row["version_sent"]) == rec.version_sent
        assert int(row["staleness"]) == rec.staleness
        assert row["accepted"] == str(rec.accepted) and row["reason"] == rec.reason
        assert int(row["bytes_up"]) == rec.bytes_up and row["msg_id"] == rec.msg_id
    assert sum(row["accepted"] == "True" for row in rows) == 5


def test_old_versions_released():
    from flwr_ext.asyncfl.engine import AsyncEngine
    from flwr_ext.asyncfl.options import EngineOptions

    eng = AsyncEngine(
        FedAsync(),
        FakeGrid(random_client, 4, per_pull=1),
        clock=vclock(),
        options=EngineOptions(num_rounds=20, poll_interval=0),
    )
    eng.run(init_arrays())
    needed = {eng.version} | {j.version for j in eng.in_flight.values()}
    assert set(eng.versions.kept) == needed
