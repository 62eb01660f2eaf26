"""FedAST (Askin et al., UAI 2024) on the async engine with the in-process FakeGrid.

Two toy tasks ``{"task0/w", "task1/w"}`` in one engine model; node ``k`` moves the task it is
sent half-way to its target ``T_k``, so every delta is ``0.5 * (T_k - base)`` and the
buffered per-task aggregation can be checked by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from flwr_ext.asyncfl.clock import VirtualClock
from flwr_ext.asyncfl.profiles import DeviceProfile
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.strategies.factory import build_strategy
from flwr_ext.strategies.fedast import (
    FedAST,
    merge_task,
    reallocate,
    split_tasks,
    stack_tasks,
    task_arrays,
    variance_proxy,
)

T = {k: np.array([k + 1.0, 2.0 * (k + 1)]) for k in range(8)}


def _init(num_tasks: int = 2) -> ArrayRecord:
    models = [{"w": Array(np.zeros(2))} for _ in range(num_tasks)]
    return ArrayRecord(stack_tasks(models))


class _Client:
    """Trains only the task in the config (``agree``: one target; ``noisy``: two)."""

    def __init__(self, noisy: tuple[int, ...] = (), agree: tuple[int, ...] = ()) -> None:
        self.sent: list[tuple[int, int, int]] = []  # (partition, task-id, task-version)
        self.noisy, self.agree = noisy, agree

    def __call__(self, pid: int, msg: Message) -> RecordDict:
        cfg = msg.content["config"]
        task = int(cfg["task-id"])
        self.sent.append((pid, task, int(cfg["task-version"])))
        base = task_arrays(msg.content["arrays"], task)["w"].numpy()
        target = T[pid]
        if task in self.agree:  # every node pulls towards the same point
            target = T[0]
        if task in self.noisy:  # nodes pull towards two far-apart points
            target = T[0] * (1 + 3 * (pid % 2))
        new = base + 0.5 * (target - base)
        arrays = merge_task(msg.content["arrays"], task, {"w": Array(new)})
        metrics = MetricRecord({"num-examples": 10, "num-steps": 1, "partition-id": pid})
        return RecordDict({"arrays": arrays, "metrics": metrics})


def _clock(tmp_path, step_times) -> VirtualClock:
    path = tmp_path / "trace.csv"
    path.write_text("node,step_time\n" + "".join(f"{k},{t}\n" for k, t in enumerate(step_times)))
    profile = DeviceProfile(
        kind="trace", trace=str(path), latency=0.0, up_mbps=1e12, down_mbps=1e12
    )
    return VirtualClock(profile, seed=0)


def test_stack_split_merge_round_trip() -> None:
    a, b = {"w": np.ones(2), "b": np.zeros(1)}, {"w": np.full(2, 2.0)}
    stacked = stack_tasks([a, b])
    assert sorted(stacked) == ["task0/b", "task0/w", "task1/w"]
    back = split_tasks(stacked, 2)
    assert back[0]["w"] is a["w"] and back[1]["w"] is b["w"]
    rec = ArrayRecord({k: Array(v) for k, v in stacked.items()})
    merged = merge_task(rec, 1, {"w": Array(np.full(2, 5.0))})
    assert list(merged) == list(rec)  # every key goes back (the engine checks them)
    np.testing.assert_array_equal(merged["task1/w"].numpy(), [5.0, 5.0])
    np.testing.assert_array_equal(merged["task0/w"].numpy(), [1.0, 1.0])
    with pytest.raises(KeyError):
        merge_task(rec, 1, {"b": Array(np.zeros(1))})


def test_variance_proxy_by_hand_is_the_square_root() -> None:
    deltas = [
        {"w": np.array([1.0, 0.0]), "fc.bias": np.array([9.0])},
        {"w": np.array([3.0, 0.0]), "fc.bias": np.array([-9.0])},
    ]
    # mean [2, 0], ||mean||^2 = 4, sum ||d - mean||^2 = 1 + 1 = 2, n = 2: 2 / (2 * 4) = 1/4;
    # the bias is skipped (as in the reference)
    assert variance_proxy(deltas) == pytest.approx(0.5)
    assert variance_proxy(deltas, scale=4.0) == pytest.approx(1.0)
    # not the reference's precedence bug (float(x)**1/2 == x / 2 = 0.125)
    assert variance_proxy(deltas) != pytest.approx(0.125)
    assert variance_proxy([{"w": np.zeros(2)}] * 3) == 0.0


def test_reallocate_by_hand() -> None:
    # R = 8, ratio 2: each task gets 2; shares int(8 * 3/4) - 2 = 4 and int(8 * 1/4) - 2 = 0;
    # the 4 left go 2 at a time to the largest share: task 0 (4 -> 2), task 0 again (2 -> 0)
    assert reallocate([3.0, 1.0], 8, 2, [True, True]) == [6, 2]
    assert reallocate([1.0, 1.0, 2.0], 8, 2, [True, True, True]) == [2, 2, 4]
    assert reallocate([5.0, 1.0], 8, 2, [False, True]) == [0, 8]
    assert reallocate([0.0, 0.0], 8, 2, [True, True]) == [2, 2]


def test_two_tasks_buffered_aggregation_by_hand(tmp_path) -> None:
    client = _Client()
    grid = FakeGrid(client, num_nodes=3, seed=3)
    strategy = FedAST(num_tasks=2, active=[2, 1], buffer_size=[2, 1], dynamic=False)
    # one step per job: nodes 0, 1, 2 take 1.0, 2.25 and 3.5 time units per job
    result = strategy.start(grid, _init(), num_rounds=3, clock=_clock(tmp_path, [1.0, 2.25, 3.5]))
    # first jobs, idle nodes in rank order, each to the task furthest below R = (2, 1)
    # (first on ties): node 0 -> task 0 (gaps 2, 1), node 1 -> task 0 (1, 1), node 2 -> task 1
    assert sorted(client.sent[:3]) == [(0, 0, 0), (1, 0, 0), (2, 1, 0)]
    t0, t1, t2 = T[0], T[1], T[2]
    # t=1:    node 0, task 0 v0: 0.5 t0 -> B0 (1 of 2); node 0 gets task 0 again (v0)
    # t=2:    node 0, task 0 v0: 0.5 t0 -> B0 full: x0 = (0.5 t0 + 0.5 t0) / 2 = 0.5 t0 [v1]
    # t=2.25: node 1, task 0 v0 (task staleness 1): 0.5 t1 -> B0 (1 of 2)
    # t=3:    node 0, task 0 v1: 0.5 (t0 - 0.5 t0) = 0.25 t0 -> B0 full:
    #         x0 = 0.5 t0 + (0.5 t1 + 0.25 t0) / 2 = 0.625 t0 + 0.25 t1 [v2]
    # t=3.5:  node 2, task 1 v0: 0.5 t2 -> B1 full (b = 1): x1 = 0.5 t2 [v3]
    np.testing.assert_allclose(result.arrays["task0/w"].numpy(), 0.625 * t0 + 0.25 * t1, rtol=1e-12)
    np.testing.assert_allclose(result.arrays["task1/w"].numpy(), 0.5 * t2, rtol=1e-12)
    rounds = result.train_metrics_clientapp
    assert [rounds[v]["task-id"] for v in (1, 2, 3)] == [0, 0, 1]
    assert [rounds[v]["task-version"] for v in (1, 2, 3)] == [1, 2, 1]
    assert [rounds[v]["time"] for v in (1, 2, 3)] == pytest.approx([2.0, 3.0, 3.5])
    # staleness is the task's own: node 1's update missed one task-0 version; node 2's
    # task-1 update is fresh although the engine committed 2 (task-0) versions meanwhile
    assert rounds[2]["staleness"] == [1, 0] and rounds[2]["nodes"] == [1, 0]
    assert rounds[3]["staleness"] == [0]
    assert strategy.task_versions == [2, 1]
    assert result.stop_reason == "num_rounds reached"


def test_dynamic_reallocation_moves_jobs_to_the_noisier_task(tmp_path) -> None:
    # task 1's updates disagree (node-dependent targets), task 0's agree: V_0 << V_1
    client = _Client(noisy=(1,), agree=(0,))
    grid = FakeGrid(client, num_nodes=8, seed=0)
    strategy = FedAST(
        num_tasks=2, active=4, buffer_size=2, dynamic=True, window=3, realloc_every=6, seed=1
    )
    steps = [1.0 + 0.1 * k for k in range(8)]
    result = strategy.start(grid, _init(), num_rounds=40, clock=_clock(tmp_path, steps))
    assert result.stop_reason == "num_rounds reached"
    history = strategy._history  # noqa: SLF001  (allocation after each reallocation)
    assert history[0][1] == [4, 4]
    assert len(history) > 1
    # task 0's proxy is ~0 (its deltas point the same way), so it keeps the minimum share
    assert strategy.allocation == [2, 6]
    # the buffer follows R_m / b_m = ratio = 2
    last = result.train_metrics_clientapp[max(result.train_metrics_clientapp)]
    assert last["active-0"] == 2 and last["active-1"] == 6
    late = [r for r in result.train_metrics_clientapp.values() if r["task-id"] == 1]
    assert late[-1]["buffer-size"] == 3
    # after the reallocation, task 1 gets more of the jobs
    tail = [task for _, task, _ in client.sent[-16:]]
    assert tail.count(1) > tail.count(0)


def test_task_rounds_stop_a_task_and_free_its_jobs(tmp_path) -> None:
    client = _Client()
    grid = FakeGrid(client, num_nodes=4, seed=0)
    strategy = FedAST(num_tasks=2, active=2, buffer_size=1, dynamic=False, task_rounds=[2, 0])
    result = strategy.start(
        grid, _init(), num_rounds=8, clock=_clock(tmp_path, [1.0, 1.1, 1.2, 1.3])
    )
    assert strategy.task_versions[0] == 2
    assert strategy.allocation == [0, 4]
    tasks = [result.train_metrics_clientapp[v]["task-id"] for v in range(1, 9)]
    assert tasks.count(0) == 2
    finished = [r for r in result.updates if r.reason.startswith("fedast task finished")]
    assert all(r.accepted is False for r in finished)


def test_from_run_config_and_factory() -> None:
    s = build_strategy(
        {
            "strategy": "fedast",
            "fedast-tasks": 3,
            "fedast-active": 6,
            "fedast-buffer-size": 3,
            "fedast-dynamic": False,
            "fedast-task-rounds": 10,
            "server-lr": 0.5,
        }
    )
    assert isinstance(s, FedAST)
    assert s.num_tasks == 3 and s.active == [6, 6, 6] and s.buffer_size == [3, 3, 3]
    assert s.ratio == 2 and not s.dynamic and s.task_rounds == [10, 10, 10]
    assert s.server_lr == [0.5] * 3 and s.realloc_every is None


def test_validation() -> None:
    with pytest.raises(ValueError, match="active"):
        FedAST(num_tasks=2, active=[1, 2, 3])
    with pytest.raises(ValueError, match="buffer_size"):
        FedAST(buffer_size=0)
    with pytest.raises(ValueError, match="task_config"):
        FedAST(num_tasks=2, task_config=[{}])


def test_model_without_task_prefixes_fails_clearly(tmp_path) -> None:
    grid = FakeGrid(_Client(), num_nodes=2)
    plain = ArrayRecord({"w": Array(np.zeros(2))})
    with pytest.raises(ValueError, match="stack_tasks"):
        FedAST().start(grid, plain, num_rounds=1, clock=_clock(tmp_path, [1.0, 1.0]))


def test_ceil_buffer_rule() -> None:
    s = FedAST(num_tasks=2, active=4, buffer_size=2)
    assert [max(1, math.ceil(r / s.ratio)) for r in (2, 6, 5)] == [1, 3, 3]
