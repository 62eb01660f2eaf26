"""The COMPASS scheduler of FedCompass, as a deterministic, Flower-free state machine.

Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power-Aware Scheduler", ICLR 2024 (arXiv:2309.14675),
Algorithm 1 (server) and Algorithm 2 (``AssignGroup`` = ``JoinGroup`` or ``CreateGroup``).

The scheduler knows nothing about models, messages or threads. The caller (the strategy
on the async engine) feeds it events on ONE clock, in time order, from ONE thread:

* :meth:`CompassScheduler.assign` - a client becomes available (start of the run, or a
  node that appears later): it gets ``Q_max`` local steps and no group until its speed is
  known ("probe" job).
* :meth:`CompassScheduler.on_arrival` - a client's local update arrived at ``now``.
* :meth:`CompassScheduler.on_deadline` - the clock reached :meth:`next_deadline`.
* :meth:`CompassScheduler.on_failure` - a dispatched client will not answer (error reply,
  node retired).

Each call returns a list of :class:`Aggregate` and :class:`Dispatch` actions that the
caller executes in list order: an ``Aggregate`` turns the listed contributions into the
next model version, ``w <- w + sum_i weight_i * (x_i - w_{base_i})``; a ``Dispatch`` sends
the model of version ``version`` to ``client`` with ``local_steps`` in its config.

Queries (no side effects): :meth:`~CompassScheduler.next_deadline`,
:meth:`~CompassScheduler.open_deadlines` (one timer per group), :meth:`~CompassScheduler.busy`,
:meth:`~CompassScheduler.has_job`, :meth:`~CompassScheduler.held` (arrived, not yet
aggregated), :meth:`~CompassScheduler.in_flight`, :meth:`~CompassScheduler.groups`, and the
``speed`` / ``version`` attributes.

Ordering rule (this is what makes the reference implementation's races impossible):
deadlines that are strictly earlier than an arrival are always fired before the arrival
is handled (``on_arrival`` does it itself, so a caller that forgets cannot orphan the
on-time members of a group). An arrival at exactly a group's deadline counts as on time
when it is handed to :meth:`on_arrival` before :meth:`on_deadline` is called for that
time; callers should process arrivals before deadlines at equal times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr_ext.staleness import polynomial

ClientId = Hashable

#: Tolerance added before ``floor`` so that e.g. ``(30.0 - 10.0) / 0.1`` gives 200, not 199.
_FLOOR_EPS = 1e-9


def polynomial_staleness(a: float = 0.5) -> Callable[[int], float]:
    """Staleness weight ``S(u) = (1 + u)^(-a)`` (FedCompass Sec. 3, after Xie et al. 2019).

    :func:`flwr_ext.staleness.polynomial` (the one staleness module). The reference code
    computes ``(1 + u)^a``, which *up-weights* stale updates for ``a > 0``; this is the
    corrected, decreasing form.
    """
    return polynomial(a)


@dataclass(frozen=True)
class Contribution:
    """One local update inside an :class:`Aggregate`.

    Attributes
    ----------
    client : hashable
        The client that trained it.
    payload : Any
        Whatever the caller passed to :meth:`CompassScheduler.on_arrival` (e.g. the arrays).
    base_version : int
        Model version the client trained from (``tau_i``).
    staleness : int
        ``version_before_aggregation - base_version`` (``t - tau_i``).
    weight : float
        ``server_lr * p_i * S(staleness)``: the factor on ``x_i - w_{base_version}``.
    local_steps : int
        Steps the client was asked to run.
    arrived_at : float
        Clock time of the arrival.
    late : bool
        True when it arrived after its group's deadline (it came from the general
        buffer); False for an on-time group member or a probe job (no group).
    """

    client: ClientId
    payload: Any
    base_version: int
    staleness: int
    weight: float
    local_steps: int
    arrived_at: float
    late: bool


@dataclass(frozen=True)
class Aggregate:
    """Produce model version ``version`` from ``contributions`` (Alg. 1, global update).

    ``w_{version} = w_{version-1} + sum_i c.weight * (x_i - w_{c.base_version})``.
    ``group`` is the arrival group that triggered it (None for a probe's single update);
    ``trigger`` says why: ``"first-arrival"`` (probe), ``"complete"`` (every member back),
    ``"deadline"`` or ``"failure"`` (the last pending member failed).
    """

    version: int
    time: float
    group: int | None
    contributions: tuple[Contribution, ...]
    trigger: str = "complete"


@dataclass(frozen=True)
class Dispatch:
    """Send model version ``version`` to ``client`` with ``local_steps`` (Alg. 2 output)."""

    client: ClientId
    local_steps: int
    group: int | None
    version: int
    time: float


Action = Aggregate | Dispatch


@dataclass
class _Job:
    local_steps: int
    group: int | None
    base_version: int
    start: float


@dataclass
class _Group:
    gid: int
    expected: float  # T_exp: expected arrival time of every member
    deadline: float  # T_max: latest arrival time = start + lambda * Q * s
    pending: list[ClientId] = field(default_factory=list)
    arrived: list[tuple[ClientId, Any, _Job, float]] = field(default_factory=list)


@dataclass
class _Buffered:
    client: ClientId
    payload: Any
    job: _Job
    arrived_at: float
    late: bool


class CompassScheduler:
    """Computing-power-aware scheduler (FedCompass, Li et al. ICLR 2024, Alg. 1-2).

    Parameters
    ----------
    q_min, q_max : int
        Bounds on the local steps assigned to a client, ``1 <= q_min <= q_max``.
    latest_time_factor : float
        ``lambda >= 1``: a group's deadline is ``lambda`` times the expected duration of the
        job of the client that created it (``T_max = now + lambda * Q * s``).
    speed_momentum : float
        ``mu`` in ``(0, 1]``: the speed estimate (seconds per local step) is updated as
        ``s <- (1 - mu) * s + mu * s_observed`` (the first observation initialises it).
        Same convention and default (0.9) as the authors' code.
    staleness_fn : callable, optional
        ``S(u)``; default ``(1 + u)^-0.5`` (:func:`polynomial_staleness`).
    server_lr : float
        ``eta``: global step size multiplying every contribution's weight.
    weighting : {"num-examples", "uniform"}
        Client weight ``p_i``: ``n_i / (N * mean_j n_j)`` over the clients that have
        reported (equals ``n_i / sum_j n_j`` once all have), or ``1 / N``; ``N`` is the
        number of clients ever assigned.
    min_speed : float
        Lower bound on a speed estimate, so a zero-duration job cannot divide by zero.

    Notes
    -----
    Versions count aggregations; the initial model is version 0. A client with no speed
    estimate yet gets ``Q_max`` and no group; its first update is applied alone at
    arrival (Alg. 1, first arrival) and it then enters ``AssignGroup``.
    """

    def __init__(
        self,
        q_min: int = 20,
        q_max: int = 100,
        latest_time_factor: float = 1.5,
        speed_momentum: float = 0.9,
        staleness_fn: Callable[[int], float] | None = None,
        server_lr: float = 1.0,
        weighting: str = "num-examples",
        min_speed: float = 1e-9,
    ) -> None:
        if not 1 <= q_min <= q_max:
            raise ValueError(f"need 1 <= q_min <= q_max, got q_min={q_min}, q_max={q_max}")
        if latest_time_factor < 1.0:
            raise ValueError(f"latest_time_factor must be >= 1, got {latest_time_factor}")
        if not 0.0 < speed_momentum <= 1.0:
            raise ValueError(f"speed_momentum must be in (0, 1], got {speed_momentum}")
        if weighting not in ("num-examples", "uniform"):
            raise ValueError(f"weighting must be 'num-examples' or 'uniform', got {weighting!r}")
        self.q_min = int(q_min)
        self.q_max = int(q_max)
        self.latest_time_factor = float(latest_time_factor)
        self.speed_momentum = float(speed_momentum)
        self.staleness_fn = staleness_fn or polynomial_staleness(0.5)
        self.server_lr = float(server_lr)
        self.weighting = weighting
        self.min_speed = float(min_speed)

        self.version = 0
        self.speed: dict[ClientId, float] = {}
        self.num_examples: dict[ClientId, float] = {}
        self._clients: list[ClientId] = []  # every client ever assigned, in order
        self._jobs: dict[ClientId, _Job] = {}  # in flight (dispatched, not yet arrived)
        self._waiting: dict[ClientId, int] = {}  # arrived on time, waiting for group gid
        self._groups: dict[int, _Group] = {}  # open groups only
        self._buffer: list[_Buffered] = []  # general buffer (late arrivals)
        self._next_gid = 0

    # ------------------------------------------------------------------ queries
    def next_deadline(self) -> float | None:
        """The earliest deadline of an open group, or None when no group is open."""
        if not self._groups:
            return None
        return min(g.deadline for g in self._groups.values())

    def has_job(self, client: ClientId) -> bool:
        """True while ``client`` has a dispatched job that has not arrived or failed."""
        return client in self._jobs

    def busy(self, client: ClientId) -> bool:
        """True while ``client`` has a job in flight or waits, arrived, for its group."""
        return client in self._jobs or client in self._waiting

    def open_deadlines(self) -> dict[int, float]:
        """``gid -> deadline`` of every open group (for setting timers on a clock)."""
        return {gid: g.deadline for gid, g in self._groups.items()}

    def held(self) -> list[tuple[ClientId, Any]]:
        """``(client, payload)`` of arrived updates not yet aggregated (buffer, then groups)."""
        out = [(b.client, b.payload) for b in self._buffer]
        for gid in sorted(self._groups):
            out.extend((c, p) for c, p, _, _ in self._groups[gid].arrived)
        return out

    def in_flight(self) -> dict[ClientId, tuple[int, int | None, int]]:
        """``client -> (local_steps, group, base_version)`` for dispatched jobs."""
        return {c: (j.local_steps, j.group, j.base_version) for c, j in self._jobs.items()}

    def groups(self) -> dict[int, dict[str, Any]]:
        """Open groups: ``gid -> {expected, deadline, pending, arrived}`` (for logs/tests)."""
        return {
            gid: {
                "expected": g.expected,
                "deadline": g.deadline,
                "pending": list(g.pending),
                "arrived": [c for c, _, _, _ in g.arrived],
            }
            for gid, g in self._groups.items()
        }

    @property
    def buffered(self) -> list[ClientId]:
        """Clients whose late updates sit in the general buffer."""
        return [b.client for b in self._buffer]

    # ------------------------------------------------------------------ events
    def assign(self, client: ClientId, now: float) -> Dispatch:
        """Dispatch an idle client (start of run, new or re-dispatched node).

        A client with no speed estimate gets ``Q_max`` and no group (probe job); one with
        an estimate goes through ``AssignGroup`` (Alg. 2).
        """
        if client in self._jobs or client in self._waiting:
            raise ValueError(f"client {client!r} is already busy")
        if client not in self._clients:
            self._clients.append(client)
        if client not in self.speed:
            return self._dispatch(client, self.q_max, None, now)
        return self._assign_group(client, now)

    def on_arrival(
        self, client: ClientId, now: float, payload: Any = None, num_examples: float = 1.0
    ) -> list[Action]:
        """Handle a local update from ``client`` at time ``now`` (Alg. 1).

        Deadlines strictly before ``now`` are fired first. Then: a probe's update is
        applied alone; an on-time group member waits for its group (and completes it if
        it was the last one pending); a late member goes to the general buffer, to be
        merged into the next aggregation, and is re-dispatched at once.
        """
        actions = self._fire_deadlines(now, inclusive=False)
        job = self._jobs.pop(client, None)
        if job is None:
            raise ValueError(f"arrival from client {client!r} which has no job in flight")
        self._update_speed(client, job, now)
        self.num_examples[client] = float(num_examples)

        if job.group is None:  # probe: immediate single-client update
            entry = _Buffered(client, payload, job, now, late=False)
            actions.append(self._aggregate([entry], now, None, "first-arrival"))
            actions.append(self._assign_group(client, now))
            return actions

        group = self._groups.get(job.group)
        if group is not None and now <= group.deadline:  # on time
            group.pending.remove(client)
            group.arrived.append((client, payload, job, now))
            self._waiting[client] = group.gid
            if not group.pending:
                actions.extend(self._close_group(group, now, "complete"))
            return actions

        # late: its group was already aggregated at the deadline (or removed)
        self._buffer.append(_Buffered(client, payload, job, now, late=True))
        actions.append(self._assign_group(client, now))
        return actions

    def on_deadline(self, now: float) -> list[Action]:
        """Fire every open group's deadline ``<= now``, earliest first.

        A group with on-time members is aggregated with the general buffer and its
        members are re-dispatched; a group nobody reached in time is just closed (its
        members will arrive late). Calling it with nothing due returns ``[]``.
        """
        return self._fire_deadlines(now, inclusive=True)

    def on_failure(self, client: ClientId, now: float) -> list[Action]:
        """Forget a dispatched client that will not answer (it is not re-dispatched).

        If it was the last pending member of its group, the group aggregates now (or is
        dropped when nobody arrived). Call :meth:`assign` to give it a new job.
        """
        actions = self._fire_deadlines(now, inclusive=False)
        job = self._jobs.pop(client, None)
        if job is None or job.group is None:
            return actions
        group = self._groups.get(job.group)
        if group is None:
            return actions
        group.pending.remove(client)
        if not group.pending:
            if group.arrived:
                actions.extend(self._close_group(group, now, "failure"))
            else:
                del self._groups[group.gid]
        return actions

    # ------------------------------------------------------------------ internals
    def _fire_deadlines(self, now: float, inclusive: bool) -> list[Action]:
        actions: list[Action] = []
        while True:
            due = [
                g
                for g in self._groups.values()
                if g.deadline < now or (inclusive and g.deadline == now)
            ]
            if not due:
                return actions
            group = min(due, key=lambda g: (g.deadline, g.gid))
            if group.arrived:
                # at `now`, not at the deadline: under a real clock the deadline is noticed
                # late, and members sent off "at the deadline" would already be late, one
                # version staler than counted, with the lag in their speed estimate
                actions.extend(self._close_group(group, now, "deadline"))
            else:  # all members late: nothing to aggregate, they will be buffered
                del self._groups[group.gid]

    def _close_group(self, group: _Group, now: float, trigger: str) -> list[Action]:
        """Aggregate a group's on-time members plus the general buffer, re-dispatch them."""
        del self._groups[group.gid]
        entries = list(self._buffer)
        self._buffer = []
        members = []
        for client, payload, job, t in group.arrived:
            entries.append(_Buffered(client, payload, job, t, late=False))
            del self._waiting[client]
            members.append(client)
        actions: list[Action] = [self._aggregate(entries, now, group.gid, trigger)]
        # fastest first: it opens the next group, slower members then join it (Alg. 2)
        members.sort(key=lambda c: self.speed[c])
        actions.extend(self._assign_group(c, now) for c in members)
        return actions

    def _weight(self, client: ClientId, staleness: int) -> float:
        n_clients = len(self._clients)
        if self.weighting == "uniform":
            p = 1.0 / n_clients
        else:
            mean_n = sum(self.num_examples.values()) / len(self.num_examples)
            p = self.num_examples[client] / (n_clients * mean_n) if mean_n > 0 else 1 / n_clients
        return self.server_lr * p * self.staleness_fn(staleness)

    def _aggregate(
        self, entries: Iterable[_Buffered], now: float, group: int | None, trigger: str
    ) -> Aggregate:
        contributions = []
        for e in entries:
            staleness = self.version - e.job.base_version
            contributions.append(
                Contribution(
                    client=e.client,
                    payload=e.payload,
                    base_version=e.job.base_version,
                    staleness=staleness,
                    weight=self._weight(e.client, staleness),
                    local_steps=e.job.local_steps,
                    arrived_at=e.arrived_at,
                    late=e.late,
                )
            )
        self.version += 1
        return Aggregate(self.version, now, group, tuple(contributions), trigger)

    def _update_speed(self, client: ClientId, job: _Job, now: float) -> None:
        observed = max((now - job.start) / job.local_steps, self.min_speed)
        if client in self.speed:
            mu = self.speed_momentum
            self.speed[client] = (1.0 - mu) * self.speed[client] + mu * observed
        else:
            self.speed[client] = observed

    def _dispatch(self, client: ClientId, steps: int, gid: int | None, now: float) -> Dispatch:
        self._jobs[client] = _Job(steps, gid, self.version, now)
        if gid is not None:
            self._groups[gid].pending.append(client)
        return Dispatch(client, steps, gid, self.version, now)

    def _assign_group(self, client: ClientId, now: float) -> Dispatch:
        """``AssignGroup`` (Alg. 2): ``JoinGroup``, else ``CreateGroup``."""
        joined = self._join_group(client, now)
        if joined is not None:
            return joined
        return self._create_group(client, now)

    def _join_group(self, client: ClientId, now: float) -> Dispatch | None:
        """Join the open group whose expected arrival needs the most steps in range."""
        s = self.speed[client]
        best: tuple[int, int] | None = None  # (steps, gid)
        for gid in sorted(self._groups):
            group = self._groups[gid]
            q = math.floor((group.expected - now) / s + _FLOOR_EPS)
            if self.q_min <= q <= self.q_max and (best is None or q > best[0]):
                best = (q, gid)
        if best is None:
            return None
        return self._dispatch(client, best[0], best[1], now)

    def _create_group(self, client: ClientId, now: float) -> Dispatch:
        """Open a new group timed to meet an existing group's next arrival (Alg. 2).

        For each open group, its fastest member is expected back, after the group's
        deadline, ``Q_max`` steps later; the client gets the largest ``Q <= Q_max`` that
        arrives by then (at least ``Q_min``), or ``Q_max`` when no group qualifies.
        """
        s = self.speed[client]
        best = -1
        for gid in sorted(self._groups):
            group = self._groups[gid]
            if now >= group.deadline:
                continue
            members = group.pending + [c for c, _, _, _ in group.arrived]
            fastest = min(self.speed[c] for c in members)
            est_next = group.deadline + fastest * self.q_max
            q = math.floor((est_next - now) / s + _FLOOR_EPS)
            if q <= self.q_max:
                best = max(best, q)
        steps = self.q_max if best < 0 else max(best, self.q_min)
        gid = self._next_gid
        self._next_gid += 1
        self._groups[gid] = _Group(
            gid=gid,
            expected=now + steps * s,
            deadline=now + self.latest_time_factor * steps * s,
        )
        return self._dispatch(client, steps, gid, now)
