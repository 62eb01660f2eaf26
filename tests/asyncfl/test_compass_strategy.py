"""FedCompass (Li et al., ICLR 2024) on the async engine, with the in-process FakeGrid.

A toy model ``{"w": R^4}``; client ``k`` moves the model half-way to its target ``t_k``, so
every update's delta is ``0.5 * (t_k - base)`` and results can be checked by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flwr_ext.asyncfl.clock import VirtualClock
from flwr_ext.asyncfl.profiles import DeviceProfile
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.staleness import constant
from flwr_ext.strategies.fedcompass import FedCompass

TARGETS = {k: np.full(4, float(k + 1), dtype=np.float64) for k in range(8)}


def _init() -> ArrayRecord:
    return ArrayRecord({"w": Array(np.zeros(4, dtype=np.float64))})


class _Client:
    """Records what each node was sent; ``slow(pid, job)`` multiplies its real steps."""

    def __init__(self, slow=None) -> None:
        self.sent: list[tuple[int, int, int]] = []  # (partition, local-steps, server-round)
        self.jobs: dict[int, int] = {}
        self.slow = slow or (lambda pid, job: 1)

    def __call__(self, pid: int, msg: Message) -> RecordDict:
        cfg = msg.content["config"]
        steps = int(cfg["local-steps"])
        self.sent.append((pid, steps, int(cfg["server-round"])))
        job = self.jobs.get(pid, 0)
        self.jobs[pid] = job + 1
        base = msg.content["arrays"]["w"].numpy()
        new = base + 0.5 * (TARGETS[pid] - base)
        metrics = {
            "num-examples": 10,
            "num-steps": steps * self.slow(pid, job),
            "partition-id": pid,
        }
        arrays = ArrayRecord({"w": Array(new)})
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})


def _trace(tmp_path, step_times) -> DeviceProfile:
    path = tmp_path / "trace.csv"
    rows = "".join(f"{k},{t}\n" for k, t in enumerate(step_times))
    path.write_text("node,step_time\n" + rows)
    # no latency, effectively infinite links: a job lasts steps * step_time
    return DeviceProfile(kind="trace", trace=str(path), latency=0.0, up_mbps=1e9, down_mbps=1e9)


def test_two_equal_nodes_group_aggregation_by_hand(tmp_path) -> None:
    client = _Client()
    grid = FakeGrid(client, num_nodes=2, seed=1)
    strategy = FedCompass(q_min=2, q_max=10, staleness=constant(), weighted_by_key=None)
    result = strategy.start(
        grid,
        _init(),
        num_rounds=3,
        clock=VirtualClock(_trace(tmp_path, [0.01, 0.01]), seed=0),
    )
    t0, t1 = TARGETS[0], TARGETS[1]
    # v1: node 0's probe alone, p = 1/2, S = 1: 0 + 0.5 * 0.5 * (t0 - 0)
    v1 = 0.25 * t0
    # v2: node 1's probe (sent version 0): v1 + 0.5 * 0.5 * (t1 - 0); it joins node 0's group
    v2 = v1 + 0.25 * t1
    # v3: the group: node 0 trained on v1, node 1 on v2
    v3 = v2 + 0.25 * (t0 - v1) + 0.25 * (t1 - v2)
    np.testing.assert_allclose(result.arrays["w"].numpy(), v3, rtol=1e-12)
    assert result.stop_reason == "num_rounds reached"
    # first jobs: Q_max at version 0; then node 0 opens a group with Q_max at version 1 and
    # node 1 joins it with the steps that fit before its expected arrival (10 - rounding)
    assert sorted(client.sent[:2]) == [(0, 10, 0), (1, 10, 0)]
    assert (0, 10, 1) in client.sent
    (n1,) = [s for s in client.sent[2:] if s[0] == 1 and s[2] == 2]
    assert 9 <= n1[1] <= 10
    m3 = result.train_metrics_clientapp[3]
    assert m3["num-updates"] == 2 and m3["group"] == 0 and m3["deadline"] == 0.0
    assert list(m3["staleness"]) == [1, 0]  # node 0 (sent v1) and node 1 (sent v2) at v2
    applied = [r for r in result.updates if r.applied_in == 3]
    assert sorted((r.node, r.staleness) for r in applied) == [(0, 1), (1, 0)]


def test_late_arrivals_and_deadlines_through_engine(tmp_path) -> None:
    # node 3 runs 3x the steps it is told on every other job: it misses its group's
    # deadline (lambda 1.2), its group is aggregated at the deadline without it, and its
    # late update is merged into the next aggregation.
    client = _Client(slow=lambda pid, job: 3 if pid == 3 and job % 2 == 1 else 1)
    grid = FakeGrid(client, num_nodes=4, seed=3)
    strategy = FedCompass(q_min=2, q_max=20, latest_time_factor=1.2)
    result = strategy.start(
        grid,
        _init(),
        num_rounds=30,
        clock=VirtualClock(_trace(tmp_path, [0.01, 0.011, 0.03, 0.05]), seed=0),
    )
    assert result.stop_reason == "num_rounds reached"
    rounds = result.train_metrics_clientapp
    assert len(rounds) == 30
    assert all(2 <= steps <= 20 for _, steps, _ in client.sent)
    assert any(steps < 20 for _, steps, _ in client.sent)  # assignment adapts to speed
    assert sum(m["deadline"] for m in rounds.values()) >= 1
    assert sum(m["late-updates"] for m in rounds.values()) >= 1
    assert all(m["late-updates"] == 0 for m in rounds.values() if m["group"] < 0)  # probes
    assert max(m["num-updates"] for m in rounds.values()) >= 2  # real group aggregations
    # recorded staleness of each applied update = the one used in its round
    for v, m in rounds.items():
        recs = [r for r in result.updates if r.applied_in == v]
        assert sorted(r.staleness for r in recs) == sorted(m["staleness"])
    # the model moved towards the targets' (equal-weight) mean
    w = result.arrays["w"].numpy()
    assert np.all(w > 0.5) and np.all(w < 4.0)
    # every accepted update was applied, or discarded (with a reason) when the run ended
    # while it waited for its group / sat in the late buffer
    for r in result.finished:
        assert r.applied_in >= 0 or (not r.accepted and r.reason.startswith("fedcompass"))


class _SilentGrid(FakeGrid):
    """Node with partition ``silent`` never answers after its first job."""

    def __init__(self, *args, silent: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.silent = silent
        self.first_done = False

    def pull_messages(self, message_ids):
        keep = []
        for mid in message_ids:
            msg = self._pending.get(mid)
            if msg is not None and self.partition[msg.metadata.dst_node_id] == self.silent:
                if self.first_done:
                    continue
                self.first_done = True
            keep.append(mid)
        return super().pull_messages(keep)


def test_client_that_never_returns_does_not_block_its_group(tmp_path) -> None:
    client = _Client()
    grid = _SilentGrid(client, num_nodes=3, seed=5, silent=2)
    strategy = FedCompass(q_min=2, q_max=10, latest_time_factor=1.5)
    result = strategy.start(
        grid,
        _init(),
        num_rounds=12,
        timeout=0.3,  # per-job wall timeout: the silent node's jobs are abandoned
        clock=VirtualClock(_trace(tmp_path, [0.01, 0.01, 0.01]), seed=0),
        max_failures=2,
        wall_timeout=60.0,
    )
    assert result.stop_reason == "num_rounds reached"
    assert result.counters["job-timeouts"] >= 1
    # after a timeout the node rests (no job queued behind one that may still run) for another
    # timeout before it is tried again, so a short run may end before its second failure
    assert result.counters["nodes-retired"] <= 1
    applied_nodes = {r.node for r in result.updates if r.applied_in > 3}
    assert applied_nodes == {0, 1}  # the two live nodes kept being aggregated and answered


def test_constructor_validates() -> None:
    with pytest.raises(ValueError):
        FedCompass(q_min=0)
    with pytest.raises(ValueError):
        FedCompass(q_min=5, q_max=4)
    with pytest.raises(ValueError):
        FedCompass(latest_time_factor=0.9)
    s = FedCompass()
    assert (s.q_min, s.q_max, s.latest_time_factor) == (20, 100, 1.5)


def test_from_run_config_keys() -> None:
    s = FedCompass.from_run_config(
        {
            "compass-q-min": 5,
            "compass-q-max": 40,
            "compass-lambda": 2.0,
            "compass-speed-momentum": 0.5,
            "compass-weighting": "uniform",
            "server-lr": 0.8,
            "staleness": "polynomial",
            "staleness-a": 1.0,
            "max-staleness": 3,
            "unrelated-key": 1,
        }
    )
    assert (s.q_min, s.q_max, s.latest_time_factor, s.speed_momentum) == (5, 40, 2.0, 0.5)
    assert (s.weighted_by_key, s.server_lr) == (None, 0.8)
    assert s.staleness(1) == pytest.approx(0.5) and s.staleness(4) == 0.0  # cut-off above 3
    d = FedCompass.from_run_config({})
    assert (d.q_min, d.q_max, d.latest_time_factor) == (20, 100, 1.5)
    assert d.staleness(3) == pytest.approx(0.5)  # (1 + 3)^-0.5


def test_staleness_cut_off_discards_update(tmp_path) -> None:
    from flwr_ext.staleness import polynomial

    client = _Client()
    grid = FakeGrid(client, num_nodes=2, seed=1)
    strategy = FedCompass(q_min=2, q_max=10, staleness=polynomial(0.5, max_staleness=0))
    result = strategy.start(
        grid, _init(), num_rounds=2, clock=VirtualClock(_trace(tmp_path, [0.01, 0.01]), seed=0)
    )
    # v1: node 0's probe (staleness 0) applied; v2: node 1's probe has staleness 1 > 0:
    # discarded, the version is committed with the model unchanged
    first, second = result.updates[0], result.updates[1]
    assert (first.node, first.applied_in) == (0, 1)
    assert (second.node, second.accepted, second.applied_in) == (1, False, -1)
    assert second.reason == "fedcompass staleness cut-off"
    np.testing.assert_allclose(result.arrays["w"].numpy(), 0.5 * 0.5 * TARGETS[0])
    assert result.train_metrics_clientapp[2]["num-updates"] == 0
