"""FedCompass' COMPASS scheduler (Li et al., ICLR 2024, Alg. 1-2) on hand-made arrivals.

Every expected number below is worked out by hand in the comments.
"""

from __future__ import annotations

import heapq
import random

import pytest

from flwr_ext.asyncfl.compass_scheduler import (
    Aggregate,
    CompassScheduler,
    Dispatch,
    polynomial_staleness,
)
from flwr_ext.staleness import polynomial


def _uniform(**kw) -> CompassScheduler:
    base = dict(q_min=2, q_max=10, latest_time_factor=1.5, speed_momentum=1.0)
    base.update(kw)
    return CompassScheduler(weighting="uniform", **base)


def _aggs(actions) -> list[Aggregate]:
    return [a for a in actions if isinstance(a, Aggregate)]


def _disp(actions) -> dict:
    return {a.client: a for a in actions if isinstance(a, Dispatch)}


def _two_member_group() -> CompassScheduler:
    """A and B (both 1 s/step) end up in group 0: expected 20, deadline 25."""
    s = _uniform()
    s.assign("A", 0.0)
    s.assign("B", 0.0)
    s.on_arrival("A", 10.0, payload="a0")  # probe: s_A = 1, creates g0: Q 10, exp 20, dl 25
    acts = s.on_arrival("B", 10.0, payload="b0")  # probe: s_B = 1, joins g0: floor(10/1) = 10
    assert _disp(acts)["B"].group == 0 and _disp(acts)["B"].local_steps == 10
    assert s.groups()[0]["expected"] == 20.0 and s.groups()[0]["deadline"] == 25.0
    return s


def test_staleness_function_is_decreasing_and_exact() -> None:
    fn = polynomial_staleness(0.5)
    assert fn(0) == 1.0
    assert fn(3) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert fn(8) == pytest.approx(1 / 3)  # (1 + 8)^-0.5
    assert fn(1) > fn(2) > fn(10)  # the reference's (1 + u)^a would increase
    assert polynomial_staleness(0.0)(7) == 1.0
    with pytest.raises(ValueError):
        polynomial_staleness(-1.0)
    assert polynomial_staleness(0.5) == polynomial(0.5)  # one staleness module


def test_q_assignment_join_create_and_grouping_by_hand() -> None:
    s = _uniform()
    # Start: no speed known -> Q_max, no group (probe jobs).
    for c in "ABC":
        d = s.assign(c, 0.0)
        assert (d.local_steps, d.group, d.version) == (10, None, 0)
    assert s.next_deadline() is None

    # A back at 10 after 10 steps: s_A = 1. Single update (version 1), then CreateGroup
    # with no open group -> Q_max = 10, g0: expected 10 + 10*1 = 20, deadline 10 + 1.5*10 = 25.
    acts = s.on_arrival("A", 10.0, payload="a-probe")
    (agg,) = _aggs(acts)
    assert agg.version == 1 and agg.group is None and agg.trigger == "first-arrival"
    assert [(c.client, c.staleness, c.late) for c in agg.contributions] == [("A", 0, False)]
    dA = _disp(acts)["A"]
    assert (dA.local_steps, dA.group, dA.version) == (10, 0, 1)
    assert s.groups()[0]["expected"] == 20.0 and s.groups()[0]["deadline"] == 25.0
    assert s.next_deadline() == 25.0

    # B back at 12: s_B = 1.2. Single update, staleness 1 - 0 = 1 (version 2). JoinGroup:
    # g0 needs floor((20 - 12) / 1.2) = floor(6.67) = 6 steps, in [2, 10] -> joins g0 with 6.
    acts = s.on_arrival("B", 12.0, payload="b-probe")
    (agg,) = _aggs(acts)
    assert agg.version == 2 and agg.contributions[0].staleness == 1
    dB = _disp(acts)["B"]
    assert (dB.local_steps, dB.group, dB.version) == (6, 0, 2)
    assert s.groups()[0]["pending"] == ["A", "B"]

    # B back at 12 + 6 * 1.2 = 19.2: on time, waits (no action), A still pending.
    assert s.on_arrival("B", 19.2, payload="b1") == []
    assert s.groups()[0]["arrived"] == ["B"] and s.groups()[0]["pending"] == ["A"]

    # A back at 20: last member -> group aggregation of version 2 into version 3:
    # B base 2 -> staleness 0, A base 1 -> staleness 1. Re-dispatch fastest first: A (1.0)
    # opens g1 with Q_max (expected 30, deadline 35); B (1.2) joins g1 with
    # floor((30 - 20) / 1.2) = 8.
    acts = s.on_arrival("A", 20.0, payload="a1")
    assert isinstance(acts[0], Aggregate)
    agg = acts[0]
    assert agg.version == 3 and agg.group == 0 and agg.time == 20.0 and agg.trigger == "complete"
    got = [(c.client, c.payload, c.base_version, c.staleness, c.late) for c in agg.contributions]
    assert got == [("B", "b1", 2, 0, False), ("A", "a1", 1, 1, False)]
    assert [c.weight for c in agg.contributions] == pytest.approx([1 / 3, (1 / 3) * 2**-0.5])
    assert [a.client for a in acts[1:]] == ["A", "B"]
    d = _disp(acts)
    assert (d["A"].local_steps, d["A"].group, d["A"].version) == (10, 1, 3)
    assert (d["B"].local_steps, d["B"].group, d["B"].version) == (8, 1, 3)
    assert s.groups()[1]["expected"] == 30.0 and s.groups()[1]["deadline"] == 35.0

    # C back at 26: s_C = 2.6, staleness 3 - 0 = 3. JoinGroup g1: floor((30 - 26) / 2.6) = 1
    # < Q_min -> no. CreateGroup: g1's fastest member (A, 1.0) is expected next at
    # 35 + 10 * 1.0 = 45 -> floor((45 - 26) / 2.6) = floor(7.31) = 7 <= Q_max -> Q = 7,
    # g2: expected 26 + 7 * 2.6 = 44.2, deadline 26 + 1.5 * 18.2 = 53.3.
    acts = s.on_arrival("C", 26.0, payload="c-probe")
    (agg,) = _aggs(acts)
    assert agg.contributions[0].staleness == 3
    assert agg.contributions[0].weight == pytest.approx((1 / 3) * 0.5)
    dC = _disp(acts)["C"]
    assert (dC.local_steps, dC.group, dC.version) == (7, 2, 4)
    assert s.groups()[2]["expected"] == pytest.approx(44.2)
    assert s.groups()[2]["deadline"] == pytest.approx(53.3)
    assert s.next_deadline() == 35.0


def test_create_group_clamps_to_q_min_and_skips_targets_beyond_q_max() -> None:
    # g0 created by A (1 s/step) at 10: deadline 25; its next arrival is 25 + 10 = 35.
    s = _uniform(q_min=4)
    s.assign("A", 0.0)
    s.assign("B", 0.0)
    s.on_arrival("A", 10.0)
    # B: 10 steps in 30 s -> s_B = 3. Join g0: floor((20 - 30) / 3) < 0 -> no (g0 has
    # expected 20 < now). Create: g0 deadline 25 < now 30 -> g0 is no target -> Q_max.
    d = _disp(s.on_arrival("B", 30.0))["B"]
    assert (d.local_steps, d.group) == (10, 1)

    # Clamp: a fresh scheduler where the target is only 2 steps away for a slow client.
    s = _uniform(q_min=4)
    s.assign("A", 0.0)
    s.assign("C", 0.0)
    s.on_arrival("A", 10.0)  # g0: exp 20, dl 25, next arrival estimate 35
    # C: s_C = 2.4 (10 steps in 24 s). Join g0: floor((20 - 24) / 2.4) < 0. Create: target
    # 35 -> floor((35 - 24) / 2.4) = floor(4.58) = 4 -> Q = 4 (= Q_min, kept).
    d = _disp(s.on_arrival("C", 24.0))["C"]
    assert (d.local_steps, d.group) == (4, 1)
    s2 = _uniform(q_min=6)
    s2.assign("A", 0.0)
    s2.assign("C", 0.0)
    s2.on_arrival("A", 10.0)
    d = _disp(s2.on_arrival("C", 24.0))["C"]
    assert d.local_steps == 6  # 4 < Q_min = 6 -> clamped up to Q_min


def test_arrival_exactly_at_deadline_is_on_time() -> None:
    s = _two_member_group()
    assert s.on_arrival("A", 20.0, payload="a1") == []
    acts = s.on_arrival("B", 25.0, payload="b1")  # == deadline: on time, completes g0
    agg = acts[0]
    assert isinstance(agg, Aggregate) and agg.group == 0 and agg.time == 25.0
    assert [(c.client, c.late) for c in agg.contributions] == [("A", False), ("B", False)]
    assert set(_disp(acts)) == {"A", "B"}
    assert s.on_deadline(25.0) == []  # the group is gone: nothing left to fire
    assert s.buffered == []


def test_arrival_just_after_deadline_does_not_orphan_on_time_members() -> None:
    # The reference bug: B arriving just after the deadline removed the group before the
    # deadline aggregation ran, and A (on time, waiting) was never answered.
    s = _two_member_group()
    assert s.on_arrival("A", 20.0, payload="a1") == []
    acts = s.on_arrival("B", 25.0 + 1e-9, payload="b1")  # no on_deadline call in between
    # 1) the overdue deadline fires first, when it is noticed (now, not its own time 25: A
    #    is sent off now): A alone (version 3), A re-dispatched
    now = 25.0 + 1e-9
    assert isinstance(acts[0], Aggregate)
    assert acts[0].time == now and acts[0].version == 3 and acts[0].trigger == "deadline"
    assert [c.client for c in acts[0].contributions] == ["A"]
    assert isinstance(acts[1], Dispatch) and acts[1].client == "A" and acts[1].time == now
    # 2) then B is late: buffered and re-dispatched at once with the current model
    assert isinstance(acts[2], Dispatch) and acts[2].client == "B" and acts[2].version == 3
    assert len(acts) == 3
    assert s.buffered == ["B"]
    # B's late update is merged into the next aggregation, with its staleness 3 - 2 = 1
    dA, dB = acts[1], acts[2]
    assert dA.group == dB.group  # B (same speed) joined A's new group
    t_a = now + dA.local_steps * s.speed["A"]
    t_b = 25.0 + 1e-9 + dB.local_steps * s.speed["B"]
    first, second = sorted([("A", t_a), ("B", t_b)], key=lambda x: x[1])
    assert s.on_arrival(first[0], first[1], payload="x") == []
    acts = s.on_arrival(second[0], second[1], payload="y")
    agg = acts[0]
    assert isinstance(agg, Aggregate) and agg.version == 4
    assert [(c.client, c.payload, c.staleness, c.late) for c in agg.contributions][0] == (
        "B",
        "b1",
        1,
        True,
    )
    assert len(agg.contributions) == 3  # buffered B + both on-time members
    assert s.buffered == []


def test_deadline_event_answers_members_and_client_that_never_returns() -> None:
    s = _two_member_group()
    assert s.on_arrival("A", 20.0, payload="a1") == []
    assert s.next_deadline() == 25.0
    assert s.on_deadline(24.999) == []  # not yet due
    acts = s.on_deadline(25.0)  # B never returns
    assert [c.client for c in acts[0].contributions] == ["A"]
    assert _disp(acts)["A"].time == 25.0
    assert "B" in s.in_flight()  # still in flight: if it ever arrives it is late
    # only A's new group is open now; its deadline still fires without B
    assert s.next_deadline() is not None and 0 not in s.groups()
    # B reported failed: it belongs to no open group, nothing to do
    assert s.on_failure("B", 26.0) == []
    assert "B" not in s.in_flight()


def test_overdue_deadline_closes_the_group_now_not_at_the_deadline() -> None:
    """Under a real clock the deadline (25) is noticed late (at 27): A is sent off at 27."""
    s = _two_member_group()
    s.on_arrival("A", 20.0, payload="a1")
    acts = s.on_deadline(27.0)
    assert _aggs(acts)[0].time == 27.0
    disp = _disp(acts)["A"]
    assert disp.time == 27.0
    # A's next job is timed from 27: its new group expects it at 27 + Q * 1 s
    assert s.groups()[disp.group]["expected"] == 27.0 + disp.local_steps * 1.0


def test_failure_of_last_pending_member_completes_group_early() -> None:
    s = _two_member_group()
    assert s.on_arrival("A", 20.0, payload="a1") == []
    acts = s.on_failure("B", 21.0)
    assert isinstance(acts[0], Aggregate) and acts[0].time == 21.0
    assert acts[0].trigger == "failure"
    assert [c.client for c in acts[0].contributions] == ["A"]
    assert set(_disp(acts)) == {"A"}
    # a group whose only members all fail is dropped without aggregation
    s = _two_member_group()
    assert s.on_failure("A", 11.0) == [] and s.on_failure("B", 12.0) == []
    assert s.groups() == {} and s.next_deadline() is None


def test_all_members_late() -> None:
    s = _two_member_group()
    version = s.version
    # A and B both miss deadline 25. A at 26: the deadline fires first with nobody
    # arrived -> group closed, no aggregation; A is buffered and re-dispatched.
    acts = s.on_arrival("A", 26.0, payload="a1")
    assert _aggs(acts) == [] and s.version == version
    assert list(_disp(acts)) == ["A"] and s.buffered == ["A"]
    acts = s.on_arrival("B", 27.0, payload="b1")
    assert _aggs(acts) == [] and list(_disp(acts)) == ["B"]
    assert s.buffered == ["A", "B"]
    # speeds moved to the observed 1.6 (A: 16 s / 10) and 1.7 (momentum 1.0)
    assert s.speed["A"] == pytest.approx(1.6) and s.speed["B"] == pytest.approx(1.7)
    # drive the run on: the two buffered updates come out in the next aggregation
    infl = s.in_flight()
    t = {c: s._jobs[c].start + infl[c][0] * s.speed[c] for c in infl}  # noqa: SLF001
    actions = []
    for c in sorted(t, key=t.get):
        actions += s.on_arrival(c, t[c], payload=f"{c}2")
    agg = _aggs(actions)[0]
    assert [(c.client, c.payload, c.late) for c in agg.contributions[:2]] == [
        ("A", "a1", True),
        ("B", "b1", True),
    ]
    assert agg.version == version + 1


def test_speed_estimate_momentum_exact() -> None:
    s = CompassScheduler(
        q_min=1, q_max=10, latest_time_factor=3.0, speed_momentum=0.9, weighting="uniform"
    )
    s.assign("A", 0.0)
    acts = s.on_arrival("A", 10.0)  # first observation 10 s / 10 steps = 1.0 (no momentum)
    assert s.speed["A"] == 1.0
    dA = _disp(acts)["A"]
    assert (dA.local_steps, dA.time) == (10, 10.0)
    acts = s.on_arrival("A", 10.0 + 2.0 * 10)  # observed 2 s/step
    assert s.speed["A"] == pytest.approx(0.1 * 1.0 + 0.9 * 2.0)  # 1.9
    dA = _disp(acts)["A"]
    s.on_arrival("A", dA.time + 0.5 * dA.local_steps)  # observed 0.5 s/step
    assert s.speed["A"] == pytest.approx(0.1 * 1.9 + 0.9 * 0.5)  # 0.64


def test_staleness_and_sample_weights_exact() -> None:
    s = CompassScheduler(
        q_min=1,
        q_max=10,
        latest_time_factor=2.0,
        speed_momentum=1.0,
        server_lr=0.5,
        staleness_fn=polynomial_staleness(1.0),  # S(u) = 1 / (1 + u)
    )
    s.assign("A", 0.0)
    s.assign("B", 0.0)
    # A (30 examples) probe back at 10, staleness 0: only A reported, mean n = 30,
    # p_A = 30 / (2 * 30) = 0.5 -> weight 0.5 * 0.5 * 1 = 0.25. A opens g0 (Q 10, exp 20).
    acts = s.on_arrival("A", 10.0, num_examples=30)
    assert _aggs(acts)[0].contributions[0].weight == pytest.approx(0.25)
    # B (10 examples) probe back at 10, staleness 1 - 0 = 1: mean n = 20,
    # p_B = 10 / 40 = 0.25, S(1) = 1/2 -> 0.5 * 0.25 * 0.5 = 0.0625. B joins g0 with Q 10.
    acts = s.on_arrival("B", 10.0, num_examples=10)
    assert _aggs(acts)[0].contributions[0].weight == pytest.approx(0.0625)
    assert _disp(acts)["B"].group == 0
    # Both back at 20 -> group aggregation at version 2: A (base 1) staleness 1,
    # B (base 2) staleness 0; p_A = 0.75, p_B = 0.25 ->
    # A: 0.5 * 0.75 * 0.5 = 0.1875, B: 0.5 * 0.25 * 1 = 0.125.
    assert s.on_arrival("A", 20.0, payload="a", num_examples=30) == []
    (agg,) = _aggs(s.on_arrival("B", 20.0, payload="b", num_examples=10))
    got = {c.client: (c.staleness, c.weight) for c in agg.contributions}
    assert got == {"A": (1, pytest.approx(0.1875)), "B": (0, pytest.approx(0.125))}
    assert agg.version == 3


def test_single_group_of_all_clients_is_fedavg_weights() -> None:
    # N clients in one group, staleness 0, eta = 1, sample weighting: weights = n_i / sum n.
    s = CompassScheduler(q_min=1, q_max=10, speed_momentum=1.0)
    sizes = {"A": 10, "B": 30, "C": 60}
    for c in sizes:
        s.assign(c, 0.0)
    for c in sizes:
        s.on_arrival(c, 10.0, num_examples=sizes[c])  # all 1 s/step, all join A's group
    assert len(s.groups()) == 1
    (gid,) = s.groups()
    acts = []
    for c in sizes:
        acts += s.on_arrival(c, 20.0, payload=c, num_examples=sizes[c])
    (agg,) = _aggs(acts)
    assert agg.group == gid
    stale = {c.client: c.staleness for c in agg.contributions}
    w = {c.client: c.weight for c in agg.contributions}
    # A was dispatched at version 1, B at 2, C at 3; aggregation at version 3.
    assert stale == {"A": 2, "B": 1, "C": 0}
    s0 = polynomial_staleness(0.5)
    assert w == pytest.approx({c: sizes[c] / 100 * s0(stale[c]) for c in sizes})


def _drive(seed: int, n: int = 6, events: int = 400, drop: float = 0.05) -> None:
    """Random virtual-clock run: check no member is ever orphaned and no update is lost."""
    rng = random.Random(seed)
    true_speed = {c: rng.choice([0.1, 0.5, 1.0, 3.0]) * rng.uniform(0.8, 1.2) for c in range(n)}
    s = CompassScheduler(q_min=5, q_max=20, latest_time_factor=1.2, speed_momentum=0.9)
    heap: list[tuple[float, int, int]] = []
    sent: dict[int, int] = {}  # client -> payload id of its in-flight job
    next_id = 0
    arrived_ids: list[int] = []
    aggregated_ids: list[int] = []
    dead: set[int] = set()
    stats = {"late": 0, "deadline": 0, "complete": 0}

    def run(actions, now: float) -> None:
        nonlocal next_id
        for a in actions:
            if isinstance(a, Aggregate):
                assert a.time <= now + 1e-12
                aggregated_ids.extend(c.payload for c in a.contributions)
                if a.group is not None:
                    stats["late"] += sum(c.late for c in a.contributions)
                    assert (a.trigger == "deadline") == (a.time == deadline_now)
                    stats["deadline" if a.trigger == "deadline" else "complete"] += 1
                assert all(c.weight > 0 and c.staleness >= 0 for c in a.contributions)
            else:
                assert s.q_min <= a.local_steps <= s.q_max
                if rng.random() < drop:
                    dead.add(a.client)
                    continue
                dur = a.local_steps * true_speed[a.client] * rng.uniform(0.7, 1.6)
                sent[a.client] = next_id
                heapq.heappush(heap, (a.time + dur, next_id, a.client))
                next_id += 1

    deadline_now = None
    for c in range(n):
        run([s.assign(c, 0.0)], 0.0)
    now = 0.0
    for _ in range(events):
        dl = s.next_deadline()
        if not heap and dl is None:
            break
        if dl is not None and (not heap or dl < heap[0][0]):
            now = deadline_now = dl
            run(s.on_deadline(now), now)
        else:
            deadline_now = None
            now, pid, c = heapq.heappop(heap)
            arrived_ids.append(pid)
            run(s.on_arrival(c, now, payload=pid, num_examples=1 + c), now)
        # invariant: nobody waits in a group whose deadline has passed
        for g in s.groups().values():
            assert g["deadline"] >= now or not g["arrived"]
        # invariant: every live client is in flight, waiting, or dead (dropped/never back)
        waiting = {c for g in s.groups().values() for c in g["arrived"]}
        assert set(s.in_flight()) | waiting | dead == set(range(n))
    # every arrived update was aggregated exactly once or is still held (waiting/buffered)
    held = len(s.buffered) + sum(len(g["arrived"]) for g in s.groups().values())
    assert len(aggregated_ids) == len(set(aggregated_ids))
    assert len(aggregated_ids) + held == len(arrived_ids)
    assert s.version > 10
    # the run exercised all three paths: complete groups, deadlines, late merges
    assert min(stats.values()) > 0, stats


@pytest.mark.parametrize("seed", range(5))
def test_random_runs_never_orphan_or_lose_updates(seed: int) -> None:
    _drive(seed)
