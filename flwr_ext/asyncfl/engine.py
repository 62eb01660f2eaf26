"""The asynchronous event loop on Flower's Grid, and the hook API strategies build on.

:class:`AsyncEngine` drives any :class:`AsyncStrategy` with ``grid.push_messages`` /
``grid.pull_messages`` only (no round barrier): every idle node gets a job, each job remembers
the model version it was sent, and replies become events that are handled one at a time, by one
thread, in clock order.

Event order
-----------
With a :class:`~flwr_ext.asyncfl.clock.VirtualClock` a job's finish time is computed from the
device profile and the real message sizes. A finished job (or a timer) at time ``t`` is handled
only when every job still in flight has a lower bound ``>= t``; so events are processed in
virtual-time order whatever order Ray returns replies in, and a seeded run is bit-identical on
1 or 16 CPUs. With :class:`~flwr_ext.asyncfl.clock.RealClock` a job finishes when its reply is
pulled and timers fire on wall time.

Node identity
-------------
Flower's simulation draws random node ids every run. The engine keys a node (for device
profiles, random draws and records) by the ``partition-id`` its reply metrics carry (the
async-vision ClientApp reports it); until a node has replied once, or if it never reports one,
it is keyed by the rank of its node id among the nodes seen (discovery order). Runs whose clients
do not report ``partition-id`` are therefore reproducible only up to the node-id draw.

Steps per job: the reply metric ``num-steps`` if present, else the ``local-steps`` sent in the
config, else ``profile.default_steps``. For event ordering, a job sent with ``local-steps`` is
assumed to run at least that many steps (``profile.min_steps`` otherwise); a reply reporting
fewer steps is counted in ``clock-violations`` and finishes at its lower bound.

Reply validation
----------------
Every pulled reply is checked before a strategy sees it; a bad one is skipped with a reason
(``result.reasons``), counted (``result.counters``) and recorded (``accepted=False``), and the run
goes on. A reply to a message this server never sent counts in ``unknown-replies``; a second
reply to a message already pulled or handled (the message-id ledger) in ``duplicate-replies``;
neither becomes an event, so an accepted update is applied at most once. A reply to one of our
jobs is rejected (``updates-rejected``, the job fails) when its message type is not ``train``,
its ArrayRecords exceed ``max_reply_bytes``, or :func:`~flwr_ext.asyncfl.validate.extract_reply`
refuses it (undecodable, wrong keys, shapes or dtypes, NaN/Inf, bad ``num-examples``).
``AsyncResult.write_ledger`` exports the accepted updates with their message ids and the version
each was applied in.

Jobs that never finish
----------------------
Every job sent gets exactly one row in ``result.updates`` (so ``len(updates)`` equals the
``jobs-dispatched`` counter): a reply (accepted or rejected), an error reply, or a job the
engine gave up on, with its reason: ``job timeout`` (no reply ``timeout`` wall seconds after
it was sent; also the message TTL), ``node vanished`` (its SuperNode left
``grid.get_node_ids()``, e.g. Flower marked it offline after missed heartbeats), ``push failed
on resume``, and, for jobs still out when the run stops, ``in flight at the end``.
With ``drain_timeout > 0`` the engine first waits, up to that many wall seconds, for those
jobs to end the normal way (strategy hooks are no longer called; a valid reply is recorded and
discarded as ``reply after the run ended``). Counters: ``jobs-abandoned`` (timeouts, vanished
nodes) and ``jobs-unfinished`` (rows written at the end).

Server cost
-----------
``server-overhead-s`` is the engine loop's wall time (dispatch, Grid calls, handling; not the
sleeps between idle polls) minus evaluation. CPU, measured with ``time.thread_time`` in the engine's
thread: ``engine-cpu-s`` covers only the handling of events (validation and decoding of each
reply, the strategy's hooks with their aggregation, ``commit``, checkpoints not included) and
``engine-cpu-ms-per-update`` divides it by the updates applied; ``server-cpu-s`` is the whole
loop (also building and pushing messages, pulling and deserialising replies, polling), both
without ``evaluate_fn`` (``evaluate-cpu-s``).

Checkpoint and resume
---------------------
With ``checkpoint_dir`` and ``checkpoint_every = N`` the engine writes a checkpoint
(:mod:`flwr_ext.asyncfl.checkpoint`, atomic tmp + rename) after the event that makes the model
version reach the next multiple of ``N``, between two events: model and every version still
referenced, clock time, nodes (rank, ``partition-id``, job counters, failures, retired), jobs in
flight, timers, counters, per-update records and metrics, and the strategy's
:meth:`AsyncStrategy.state_dict` (FedBuff's buffer and momentum, FedAvg's cohort, FedCompass'
scheduler: speed estimates, groups, deadlines, general buffer). There is no other random state:
the virtual clock's draws are keyed by ``(seed, node, job index)`` and FedAvg's sampling by
``(seed, version)``.

``resume_from`` restores it. Jobs that were in flight (including replies pulled but not yet
handled) are sent again, unchanged: same node, model version, config and job index, so with
deterministic clients their replies, virtual finish times and everything after are those of the
uninterrupted run (bit-exact under a virtual clock; tested per strategy). Nodes are re-bound by
node id when unchanged, else by ``partition-id``: a new simulation draws new node ids, so each
unknown node first gets one identification job (current model, ``local-steps = 1``,
``flwr-ext-identify = 1``) whose reply is read only for its ``partition-id``. Stateful clients
(error feedback in ``context.state``) see that extra job. Saved nodes that do not come back are
retired and their jobs fail as "node vanished". Under a real clock a resumed run continues at the
saved clock time; replies of the crashed process are not awaited.

Hook API (stable; FedCompass builds on it)
------------------------------------------
A strategy subclasses :class:`AsyncStrategy` and overrides some of these hooks. The engine
calls them from its single thread, in clock order; ``engine`` is the :class:`AsyncEngine`.

``on_start(engine)``
    Once, after nodes are discovered and version 0 is evaluated.
``configure_dispatch(engine, idle) -> list[(NodeState, dict)]``
    Called whenever nodes are idle (after every handled event). Return the nodes to send a
    job to now, each with extra config entries for that job (e.g. ``{"local-steps": 12}``);
    nodes not returned stay idle until the next call. Default: every idle node, no extras.
``on_update(engine, update)``
    A valid reply (decoded, finite, right keys and shapes), with ``update.staleness`` set.
    The strategy buffers it, or calls ``engine.commit(...)`` / ``engine.discard(...)``.
``on_timer(engine, timer)``
    A timer set with ``engine.set_timer(at, payload)`` is due. Timers and job completions
    share one clock; a completion at the same time as a timer is handled first.
``on_job_failed(engine, job, reason)``
    A job produced an error reply, a rejected update, timed out, or its node vanished.
``on_finish(engine)``
    Once, before the result is returned (e.g. to flush a partial buffer).
``state_dict()`` / ``load_state_dict(engine, state)``
    The strategy's run state for checkpoints (default: its ``_``-prefixed attributes); on
    resume ``load_state_dict`` is called instead of ``on_start``. Key per-node state by
    ``NodeState.rank`` (stable across a resume), not by Flower's node id.

Engine API for hooks: ``engine.now``, ``engine.version``, ``engine.params`` (current global
``dict[str, np.ndarray]``), ``engine.model_at(v)`` (the arrays of version ``v`` while a job or
update still needs them), ``engine.commit(params, updates, metrics=None)`` (new server model
version from ``updates``), ``engine.discard(update, reason)``, ``engine.set_timer(at,
payload) -> Timer``, ``engine.cancel_timer(timer)``, ``engine.nodes`` (active
:class:`NodeState` by node id), ``engine.in_flight`` (:class:`Job` by message id),
``engine.num_rounds``. :mod:`flwr_ext.asyncfl.aggregate` holds the delta arithmetic
(``weighted_delta``, ``add_scaled``) with staleness weights from :mod:`flwr_ext.staleness`.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_ext.asyncfl.checkpoint import load_checkpoint, save_checkpoint
from flwr_ext.asyncfl.clock import RealClock, VirtualClock
from flwr_ext.asyncfl.records import IN_FLIGHT_AT_END, AsyncResult, UpdateRecord
from flwr_ext.asyncfl.validate import extract_reply, to_numpy

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

_ERROR_NAMES = {
    ErrorCode.UNKNOWN: "unknown error",
    ErrorCode.LOAD_CLIENT_APP_EXCEPTION: "ClientApp failed to load",
    ErrorCode.CLIENT_APP_RAISED_EXCEPTION: "ClientApp raised an exception",
    ErrorCode.MESSAGE_UNAVAILABLE: "message unavailable (expired TTL)",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply unavailable (expired TTL)",
    ErrorCode.NODE_UNAVAILABLE: "node unavailable",
    ErrorCode.MOD_FAILED_PRECONDITION: "mod failed precondition",
    ErrorCode.CLIENT_APP_CRASHED: "ClientApp crashed",
}


@dataclass
class NodeState:
    """One SuperNode as the engine sees it."""

    node_id: int
    rank: int
    key: int | None = None
    jobs: int = 0
    failures: int = 0
    busy: bool = False
    retired: bool = False

    @property
    def ident(self) -> int:
        """``partition-id`` once reported, else the discovery rank."""
        return self.key if self.key is not None else self.rank


@dataclass
class Job:
    """One train instruction in flight."""

    node: NodeState
    job_index: int
    version: int
    msg_id: str
    extra: dict[str, Any]
    sent_steps: int | None
    t_dispatch: float
    wall_dispatch: float
    bytes_down: int
    lower_bound: float
    t_finish: float | None = None


@dataclass
class Update:
    """A valid reply, ready for a strategy."""

    job: Job
    params: dict[str, np.ndarray]
    base: dict[str, np.ndarray]
    num_examples: float
    metrics: dict[str, Any]
    num_steps: int
    t_finish: float
    bytes_up: int
    staleness: int = 0
    record: UpdateRecord | None = None

    @property
    def version(self) -> int:
        """The model version this update was trained on."""
        return self.job.version

    @property
    def node_key(self) -> int:
        """Stable node key (``partition-id`` or rank)."""
        return self.job.node.ident

    @property
    def duration(self) -> float:
        """Clock time from dispatch to finish."""
        return self.t_finish - self.job.t_dispatch

    def delta(self) -> dict[str, np.ndarray]:
        """``params - base``: the change this client made to the model it was sent."""
        return {k: self.params[k] - self.base[k] for k in self.base}


@dataclass(order=True)
class Timer:
    """A strategy timer on the engine's clock."""

    at: float
    seq: int
    payload: Any = field(compare=False, default=None)
    cancelled: bool = field(compare=False, default=False)


class AsyncStrategy:
    """Base of the strategies run by :class:`AsyncEngine` (see the module docstring).

    Parameters
    ----------
    weighted_by_key : str
        Reply metric used as the sample count (``num-examples``; 1 when missing).
    arrayrecord_key, configrecord_key : str
        Keys of the records in train instructions (as Flower's FedAvg).
    """

    def __init__(
        self,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> %r", self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------ entry point
    def start(  # noqa: PLR0913
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        clock: VirtualClock | RealClock | None = None,
        max_time: float = math.inf,
        eval_every: int = 1,
        eval_period: float = 0.0,
        wall_timeout: float | None = None,
        max_failures: int = 3,
        min_nodes: int = 1,
        poll_interval: float = 0.02,
        node_poll_interval: float = 2.0,
        csv_path: str | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        resume_from: str | None = None,
        max_reply_bytes: int = 0,
        ledger_path: str | None = None,
        drain_timeout: float = 0.0,
    ) -> AsyncResult:
        """Run until ``num_rounds`` server model updates (or ``max_time`` / ``wall_timeout``).

        Same signature and return type as :meth:`flwr.serverapp.strategy.Strategy.start`;
        a "round" is one server model update. ``timeout`` is the per-job wall timeout.
        ``evaluate_config`` is accepted for compatibility (no client-side evaluation).

        Parameters
        ----------
        clock : VirtualClock or RealClock, optional
            Default: ``RealClock()``.
        max_time : float
            Stop when the clock passes this time.
        eval_every : int
            Call ``evaluate_fn`` every this many model versions (and on the last one).
        eval_period : float
            If > 0, evaluate instead on the first version at or after every multiple of this
            clock time (an even time grid for time-to-accuracy curves).
        wall_timeout : float, optional
            Wall-clock limit of the whole run.
        max_failures : int
            Consecutive failed jobs after which a node is retired.
        min_nodes : int
            Wait (up to ``wall_timeout``) until this many nodes are connected.
        poll_interval, node_poll_interval : float
            Seconds between ``pull_messages`` / ``get_node_ids`` calls when idle.
        csv_path : str, optional
            Write the per-update records there at the end.
        checkpoint_dir : str, optional
            Write a checkpoint there (atomically) every ``checkpoint_every`` server model
            versions (see "Checkpoint and resume" in the module docstring).
        checkpoint_every : int
            Versions between checkpoints; 0 disables checkpointing.
        resume_from : str, optional
            A checkpoint file, or a checkpoint directory (its newest checkpoint): continue that
            run instead of starting from ``initial_arrays``.
        max_reply_bytes : int
            Reject replies whose ArrayRecords exceed this many bytes (0: no limit).
        ledger_path : str, optional
            Write the ledger of accepted updates (message ids, node, versions) there at the end
            (:meth:`AsyncResult.write_ledger`).
        drain_timeout : float
            After the run ends, keep pulling for up to this many wall seconds until every job
            still in flight has replied, failed or timed out (see "Jobs that never finish" in
            the module docstring). 0: do not wait.
        """
        engine = AsyncEngine(
            self,
            grid,
            clock=clock if clock is not None else RealClock(),
            num_rounds=num_rounds,
            job_timeout=timeout,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
            max_time=max_time,
            eval_every=eval_every,
            eval_period=eval_period,
            wall_timeout=wall_timeout,
            max_failures=max_failures,
            min_nodes=min_nodes,
            poll_interval=poll_interval,
            node_poll_interval=node_poll_interval,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            max_reply_bytes=max_reply_bytes,
            drain_timeout=drain_timeout,
        )
        result = engine.run(initial_arrays, resume_from=resume_from)
        if csv_path:
            result.write_csv(csv_path)
        if ledger_path:
            result.write_ledger(ledger_path)
        return result

    # ------------------------------------------------------------------ hooks
    def on_start(self, engine: AsyncEngine) -> None:
        """Called once before the first dispatch."""

    def configure_dispatch(
        self, engine: AsyncEngine, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Nodes to send a job to now, with extra config. Default: all idle nodes."""
        return [(node, {}) for node in idle]

    def on_update(self, engine: AsyncEngine, update: Update) -> None:
        """Handle one valid update (buffer it, or ``engine.commit`` / ``engine.discard``)."""
        raise NotImplementedError

    def on_timer(self, engine: AsyncEngine, timer: Timer) -> None:
        """A timer set with ``engine.set_timer`` is due."""

    def on_job_failed(self, engine: AsyncEngine, job: Job, reason: str) -> None:
        """A job ended without a valid update."""

    def on_finish(self, engine: AsyncEngine) -> None:
        """Called once when the run ends."""

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's mutable run state, for a checkpoint.

        Default: every attribute whose name starts with ``_`` (constructor parameters are
        public and are not saved: the resumed strategy is constructed with the same ones).
        Values may reference the engine's objects (updates, nodes, timers): the engine
        pickles them together with its own state, so they stay shared after loading.
        Override when a private attribute cannot be pickled (a closure).
        """
        return {k: v for k, v in vars(self).items() if k.startswith("_")}

    def load_state_dict(self, engine: AsyncEngine, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called instead of :meth:`on_start` on resume)."""
        for key, value in state.items():
            setattr(self, key, value)


class AsyncEngine:  # pylint: disable=too-many-instance-attributes
    """Event loop on a Flower Grid (see the module docstring for the contract)."""

    def __init__(  # noqa: PLR0913
        self,
        strategy: AsyncStrategy,
        grid: Grid,
        *,
        clock: VirtualClock | RealClock,
        num_rounds: int,
        job_timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        max_time: float = math.inf,
        eval_every: int = 1,
        eval_period: float = 0.0,
        wall_timeout: float | None = None,
        max_failures: int = 3,
        min_nodes: int = 1,
        poll_interval: float = 0.02,
        node_poll_interval: float = 2.0,
        checkpoint_dir: str | None = None,
        checkpoint_every: int = 0,
        max_reply_bytes: int = 0,
        drain_timeout: float = 0.0,
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.clock = clock
        self.num_rounds = int(num_rounds)
        self.job_timeout = float(job_timeout)
        self.train_config = dict(train_config or {})
        self.evaluate_fn = evaluate_fn
        self.max_time = float(max_time)
        self.eval_every = max(1, int(eval_every))
        self.eval_period = float(eval_period)
        self._next_eval = self.eval_period
        self.wall_timeout = wall_timeout
        self.max_failures = int(max_failures)
        self.min_nodes = int(min_nodes)
        self.poll_interval = float(poll_interval)
        self.node_poll_interval = float(node_poll_interval)
        self.checkpoint_dir = checkpoint_dir or None
        self.checkpoint_every = max(0, int(checkpoint_every))
        self.max_reply_bytes = max(0, int(max_reply_bytes))
        self.drain_timeout = max(0.0, float(drain_timeout))
        self._draining = False
        self._last_checkpoint = 0

        self.nodes: dict[int, NodeState] = {}
        self.in_flight: dict[str, Job] = {}
        self.version = 0
        self.params: dict[str, np.ndarray] = {}
        self._versions: dict[int, tuple[dict[str, np.ndarray], ArrayRecord, int]] = {}
        self._events: list[tuple] = []
        self._timers_seq = 0
        self._seq = 0
        self._ledger: set[str] = set()
        self._replied: set[str] = set()
        self._num_seen_nodes = 0
        self._stop_reason = ""
        self.result = AsyncResult()
        self.counters: dict[str, float] = {
            k: 0
            for k in (
                "jobs-dispatched",
                "updates-received",
                "updates-accepted",
                "updates-applied",
                "updates-rejected",
                "updates-discarded",
                "error-replies",
                "job-timeouts",
                "duplicate-replies",
                "unknown-replies",
                "nodes-retired",
                "nodes-discovered",
                "clock-violations",
                "jobs-abandoned",
                "jobs-unfinished",
            )
        }
        self.reasons: dict[str, int] = {}
        self._overhead = 0.0
        self._eval_time = 0.0
        self._eval_cpu = 0.0
        self._handle_cpu = 0.0
        self._loop_cpu = 0.0
        self._wall0 = time.monotonic()
        self._last_node_poll = self._wall0

    # ------------------------------------------------------------------ public API for hooks
    @property
    def now(self) -> float:
        """Current clock time (virtual or wall seconds since start)."""
        return self.clock.now

    def model_at(self, version: int) -> dict[str, np.ndarray]:
        """Arrays of model ``version`` (kept while a job in flight was sent it)."""
        return self._versions[version][0]

    def set_timer(self, at: float, payload: Any = None) -> Timer:
        """Call ``strategy.on_timer`` at clock time ``at`` (not before ``now``)."""
        self._timers_seq += 1
        timer = Timer(max(float(at), self.now), self._timers_seq, payload)
        self._push_event(timer.at, 1, 0, timer.seq, ("timer", timer))
        return timer

    def cancel_timer(self, timer: Timer) -> None:
        """Cancel a timer that has not fired."""
        timer.cancelled = True

    def discard(self, update: Update, reason: str) -> None:
        """Record ``update`` as rejected by the strategy (e.g. too stale)."""
        self.counters["updates-discarded"] += 1
        self._count_reason(reason)
        if update.record is not None:
            update.record.accepted = False
            update.record.reason = reason

    def commit(
        self,
        params: dict[str, np.ndarray],
        updates: list[Update],
        metrics: dict[str, float] | None = None,
    ) -> int:
        """Make ``params`` the new global model (one server update) from ``updates``.

        Returns the new version. Evaluates it every ``eval_every`` versions.
        """
        self.version += 1
        self.params = params
        self._store_version(self.version, params)
        self._gc_versions()
        now, wall = self.now, time.monotonic() - self._wall0
        stale = [u.staleness for u in updates]
        for u in updates:
            self.counters["updates-applied"] += 1
            if u.record is not None:
                u.record.applied_in = self.version
        rec = MetricRecord(
            {
                "time": float(now),
                "wall-time": float(wall),
                "num-updates": len(updates),
                "mean-staleness": float(np.mean(stale)) if stale else 0.0,
                "max-staleness": int(max(stale)) if stale else 0,
                "staleness": [int(s) for s in stale],
                "nodes": [int(u.node_key) for u in updates],
                **_mean_metrics(updates),
                **{k: float(v) for k, v in (metrics or {}).items()},
            }
        )
        self.result.train_metrics_clientapp[self.version] = rec
        if self.eval_period > 0:
            due = now >= self._next_eval
            if due:
                self._next_eval = (math.floor(now / self.eval_period) + 1) * self.eval_period
        else:
            due = self.version % self.eval_every == 0
        if due or self.version >= self.num_rounds:
            self._evaluate()
        return self.version

    # ------------------------------------------------------------------ main loop
    def run(self, initial_arrays: ArrayRecord, resume_from: str | None = None) -> AsyncResult:
        """Run the strategy; return the result (see :class:`AsyncResult`).

        With ``resume_from`` (a checkpoint file or directory) the run continues from that
        checkpoint and ``initial_arrays`` is ignored.
        """
        log(INFO, "Starting %s on %s clock", type(self.strategy).__name__, _clock_name(self.clock))
        self.strategy.summary()
        self.clock.reset()
        self._wall0 = time.monotonic()
        if resume_from:
            self._resume(load_checkpoint(resume_from))
        else:
            self.params = to_numpy(initial_arrays)
            self._store_version(0, self.params, initial_arrays)
            self.result.arrays = initial_arrays
            self._wait_for_nodes()
            self._evaluate()
            self.strategy.on_start(self)
        self._last_node_poll = time.monotonic()
        while not self._done():
            self._maybe_poll_nodes()
            t0, c0, e0, ec0 = (
                time.perf_counter(),
                time.thread_time(),
                self._eval_time,
                self._eval_cpu,
            )
            self._dispatch()
            got = self._pull()
            self._check_job_timeouts()
            handled = self._process_ready()
            # evaluation is not server overhead
            self._overhead += time.perf_counter() - t0 - (self._eval_time - e0)
            self._loop_cpu += time.thread_time() - c0 - (self._eval_cpu - ec0)
            if self._done():
                break
            if self._stalled():
                self._stop_reason = "stalled: no job in flight, no timer, nothing dispatched"
                log(WARNING, "AsyncEngine %s", self._stop_reason)
                break
            if not got and not handled:
                time.sleep(self.poll_interval)
        self.strategy.on_finish(self)
        if self.version not in self.result.evaluate_metrics_serverapp:
            self._evaluate()
        self._drain()
        self._record_unfinished()
        return self._finish()

    def _drain(self) -> None:
        """After the run: wait (up to ``drain_timeout``) for the jobs still in flight.

        Each ends as it would during the run (reply, error reply, job timeout, node vanished)
        and gets its row; a valid reply is discarded with the reason "reply after the run
        ended". Strategy hooks are not called any more and the model does not change.
        """
        if not self.drain_timeout or not self.in_flight:
            return
        self._draining = True
        deadline = time.monotonic() + self.drain_timeout
        log(INFO, "Draining %d jobs still in flight", len(self.in_flight))
        while self.in_flight and time.monotonic() < deadline:
            self._maybe_poll_nodes()
            c0 = time.thread_time()
            got = self._pull()
            self._check_job_timeouts()
            while self._events:
                t, *_, payload = heapq.heappop(self._events)
                if payload[0] != "timer":
                    self.clock.advance(max(self.now, t))
                    self._handle_event(payload)
            self._loop_cpu += time.thread_time() - c0
            if not got:
                time.sleep(self.poll_interval)

    def _record_unfinished(self) -> None:
        """One row per job sent that never finished, reason "in flight at the end".

        A reply already pulled whose event lies after the end counts as in flight too (under
        a virtual clock it finishes later; which replies were pulled depends on arrival order).
        """
        for job in sorted(self.in_flight.values(), key=lambda j: (j.node.ident, j.job_index)):
            self._count_reason(IN_FLIGHT_AT_END)
            self._record(job, None, accepted=False, reason=IN_FLIGHT_AT_END)
        self.counters["jobs-unfinished"] = float(len(self.in_flight))

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue the run (see "Checkpoint and resume").

        Taken between two events. Jobs in flight (including replies pulled but not yet
        handled) are saved as jobs: a resumed run sends them again, unchanged.
        """
        needed = {self.version} | {j.version for j in self.in_flight.values()}
        timers = [p[1] for *_, p in self._events if p[0] == "timer" and not p[1].cancelled]
        return {
            "strategy": type(self.strategy).__name__,
            "strategy_state": self.strategy.state_dict(),
            "clock": _clock_name(self.clock),
            "now": float(self.now),
            "version": self.version,
            "params": self.params,
            "models": {v: self._versions[v][0] for v in sorted(needed)},
            "nbytes": {v: self._versions[v][2] for v in sorted(needed)},
            "nodes": sorted(self.nodes.values(), key=lambda n: n.rank),
            "in_flight": sorted(self.in_flight.values(), key=lambda j: (j.node.rank, j.job_index)),
            "timers": sorted(timers),
            "timers_seq": self._timers_seq,
            "seq": self._seq,
            "num_seen_nodes": self._num_seen_nodes,
            "counters": dict(self.counters),
            "reasons": dict(self.reasons),
            "ledger": sorted(self._ledger),
            "next_eval": self._next_eval,
            "updates": self.result.updates,
            "train_metrics": {v: dict(m) for v, m in self.result.train_metrics_clientapp.items()},
            "evaluate_metrics": {
                v: dict(m) for v, m in self.result.evaluate_metrics_serverapp.items()
            },
            "overhead": self._overhead,
            "eval_time": self._eval_time,
            "cpu": (self._loop_cpu, self._handle_cpu, self._eval_cpu),
        }

    def _maybe_checkpoint(self) -> None:
        if not self.checkpoint_dir or not self.checkpoint_every:
            return
        if self.version < self._last_checkpoint + self.checkpoint_every:
            return
        t0 = time.perf_counter()
        path = save_checkpoint(self.checkpoint_dir, self.snapshot())
        self._last_checkpoint = self.version
        self.counters["checkpoints-written"] = self.counters.get("checkpoints-written", 0) + 1
        log(
            INFO,
            "Checkpoint of version %d: %s (%.3f s)",
            self.version,
            path,
            time.perf_counter() - t0,
        )

    def _resume(self, st: dict[str, Any]) -> None:
        """Restore a :meth:`snapshot`; re-bind nodes; send the saved in-flight jobs again."""
        name = type(self.strategy).__name__
        if st["strategy"] != name:
            raise ValueError(f"checkpoint is of {st['strategy']}, not {name}")
        if st["clock"] != _clock_name(self.clock):
            raise ValueError(f"checkpoint has a {st['clock']} clock, this run a different one")
        self.clock.resume_at(st["now"])
        self.version = int(st["version"])
        self.params = st["params"]
        for v, params in st["models"].items():
            self._store_version(v, params)
            _, arrays, _ = self._versions[v]
            self._versions[v] = (params, arrays, int(st["nbytes"][v]))
        self.result.arrays = self._versions[self.version][1]
        self.result.updates = st["updates"]
        self.result.train_metrics_clientapp.update(
            {v: MetricRecord(m) for v, m in st["train_metrics"].items()}
        )
        self.result.evaluate_metrics_serverapp.update(
            {v: MetricRecord(m) for v, m in st["evaluate_metrics"].items()}
        )
        self.counters.update(st["counters"])
        self.counters["resumes"] = self.counters.get("resumes", 0) + 1
        self.reasons = dict(st["reasons"])
        self._ledger = set(st["ledger"])
        self._next_eval = float(st["next_eval"])
        self._timers_seq, self._seq = int(st["timers_seq"]), int(st["seq"])
        self._num_seen_nodes = int(st["num_seen_nodes"])
        self._overhead, self._eval_time = float(st["overhead"]), float(st["eval_time"])
        self._loop_cpu, self._handle_cpu, self._eval_cpu = st.get("cpu", (0.0, 0.0, 0.0))
        self._last_checkpoint = self.version
        self._wait_for_nodes()
        self._rebind_nodes(st["nodes"])
        for timer in st["timers"]:
            self._push_event(timer.at, 1, 0, timer.seq, ("timer", timer))
        self.strategy.load_state_dict(self, st["strategy_state"])
        self._redispatch(st["in_flight"])
        self._poll_nodes()  # saved nodes that did not come back: retired, their jobs failed
        log(
            INFO,
            "Resumed %s at version %d, t=%.3f, %d jobs re-sent",
            name,
            self.version,
            self.now,
            len(self.in_flight),
        )

    def _rebind_nodes(self, saved: list[NodeState]) -> None:
        """Map the saved nodes onto the connected ones (node ids may all have changed).

        Same node id: the same node. Otherwise a saved node that had reported its
        ``partition-id`` is the connected node that reports the same one (learned with one
        identification job per unknown node, see the module docstring); saved nodes that
        never reported one take the remaining connected nodes in rank / node-id order.
        """
        current = sorted(int(n) for n in self.grid.get_node_ids())
        present = set(current)
        saved_ids = {n.node_id for n in saved}
        new_ids = [nid for nid in current if nid not in saved_ids]
        lost = [n for n in saved if n.node_id not in present and not n.retired]
        keys = self._identify(new_ids) if new_ids and lost else {}
        by_key = {n.key: n for n in lost if n.key is not None}
        bound: dict[int, NodeState] = {}
        for nid in new_ids:
            node = by_key.pop(keys.get(nid, -1), None) if keys.get(nid) is not None else None
            if node is not None:
                bound[nid] = node
        rest_saved = [n for n in lost if n.key is None]
        rest_new = [nid for nid in new_ids if nid not in bound]
        for nid, node in zip(rest_new, rest_saved, strict=False):
            bound[nid] = node
        self.nodes = {}
        for node in saved:
            node.busy = False
            self.nodes[node.node_id] = node  # kept under its old id unless re-bound below
        for nid, node in bound.items():
            del self.nodes[node.node_id]
            node.node_id = nid
            self.nodes[nid] = node
        for nid in new_ids:
            if nid not in bound:  # a node the saved run never saw
                node = NodeState(node_id=nid, rank=self._num_seen_nodes, key=keys.get(nid))
                self._num_seen_nodes += 1
                self.counters["nodes-discovered"] += 1
                self.nodes[nid] = node

    def _identify(self, node_ids: list[int]) -> dict[int, int]:
        """``node id -> partition-id`` of new nodes, from one short train job each.

        The job carries the current model with ``local-steps = 1`` and
        ``flwr-ext-identify = 1`` in its config; its reply is used only for the
        ``partition-id`` metric (not aggregated, not a clock event, not recorded).
        """
        _, arrays, _ = self._versions[self.version]
        cfg = {**self.train_config, "server-round": self.version, "local-steps": 1}
        cfg["flwr-ext-identify"] = 1
        msgs = [self._train_message(nid, arrays, cfg) for nid in node_ids]
        ids = set(self.grid.push_messages(msgs))
        want = {m.metadata.message_id: nid for m, nid in zip(msgs, node_ids, strict=True)}
        want = {mid: nid for mid, nid in want.items() if mid in ids}
        self.counters["resume-identify-jobs"] = len(want)
        keys: dict[int, int] = {}
        deadline = time.monotonic() + min(self.job_timeout, 600.0)
        while want and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(want)):
                nid = want.pop(reply.metadata.reply_to_message_id, None)
                if nid is None or reply.has_error():
                    continue
                metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
                if "partition-id" in metrics:
                    keys[nid] = int(metrics["partition-id"])
            if want:
                time.sleep(self.poll_interval)
        return keys

    def _train_message(self, node_id: int, arrays: ArrayRecord, cfg: dict[str, Any]) -> Message:
        content = RecordDict(
            {
                self.strategy.arrayrecord_key: arrays,
                self.strategy.configrecord_key: ConfigRecord(cfg),
            }
        )
        return Message(
            content=content,
            dst_node_id=node_id,
            message_type=MessageType.TRAIN,
            ttl=self.job_timeout,
        )

    def _redispatch(self, jobs: list[Job]) -> None:
        """Send the saved in-flight jobs again: same node, version, config, job index."""
        self.in_flight = {}
        live = [j for j in jobs if j.node.node_id in self.nodes and not j.node.retired]
        present = set(int(n) for n in self.grid.get_node_ids())
        live = [j for j in live if j.node.node_id in present]
        msgs = []
        for job in live:
            cfg = {**self.train_config, **job.extra, "server-round": job.version}
            msgs.append(self._train_message(job.node.node_id, self._versions[job.version][1], cfg))
        ids = set(self.grid.push_messages(msgs)) if msgs else set()
        for job, msg in zip(live, msgs, strict=True):
            mid = msg.metadata.message_id
            if mid and mid in ids:
                job.msg_id = mid
            else:
                job.msg_id = f"unsent:{job.node.rank}:{job.job_index}"
            job.wall_dispatch = time.monotonic()
            job.node.busy = True
            self.in_flight[job.msg_id] = job
        for job in jobs:
            if job not in live:  # its node is gone: _poll_nodes retires it, fails the job
                job.msg_id = f"lost:{job.node.rank}:{job.job_index}"
                self.in_flight[job.msg_id] = job
        for mid, job in list(self.in_flight.items()):
            if mid.startswith("unsent:"):
                self._abandon(mid, job, "push failed on resume")

    # ------------------------------------------------------------------ internals
    def _done(self) -> bool:
        if self.version >= self.num_rounds:
            self._stop_reason = self._stop_reason or "num_rounds reached"
            return True
        if self.clock.now >= self.max_time:
            self._stop_reason = self._stop_reason or "max_time reached"
            return True
        if self.wall_timeout is not None and time.monotonic() - self._wall0 > self.wall_timeout:
            self._stop_reason = self._stop_reason or "wall timeout"
            return True
        if not any(not n.retired for n in self.nodes.values()):
            self._stop_reason = self._stop_reason or "no active nodes"
            return True
        return False

    def _stalled(self) -> bool:
        idle = any(not n.busy and not n.retired for n in self.nodes.values())
        return not self.in_flight and not self._events and idle and self.clock.is_virtual

    def _wait_for_nodes(self) -> None:
        while True:
            self._poll_nodes()
            if len(self.nodes) >= self.min_nodes:
                return
            if self.wall_timeout is not None and time.monotonic() - self._wall0 > self.wall_timeout:
                return
            log(INFO, "Waiting for nodes: %d of %d", len(self.nodes), self.min_nodes)
            time.sleep(1.0)

    def _maybe_poll_nodes(self) -> None:
        """:meth:`_poll_nodes` at most every ``node_poll_interval`` wall seconds."""
        if time.monotonic() - self._last_node_poll > self.node_poll_interval:
            self._poll_nodes()
            self._last_node_poll = time.monotonic()

    def _poll_nodes(self) -> None:
        current = sorted(int(n) for n in self.grid.get_node_ids())
        for nid in current:
            if nid not in self.nodes:
                self.nodes[nid] = NodeState(node_id=nid, rank=self._num_seen_nodes)
                self._num_seen_nodes += 1
                self.counters["nodes-discovered"] += 1
        present = set(current)
        for nid, node in list(self.nodes.items()):
            if nid not in present and not node.retired:
                self._retire(node, "node vanished")
                for mid, job in list(self.in_flight.items()):
                    if job.node is node and mid not in self._replied:
                        self._abandon(mid, job, "node vanished")

    def _retire(self, node: NodeState, reason: str) -> None:
        node.retired = True
        node.busy = False
        self.counters["nodes-retired"] += 1
        log(WARNING, "Retiring node %d (key %d): %s", node.node_id, node.ident, reason)

    def _abandon(self, mid: str, job: Job, reason: str) -> None:
        """Give up on a job that will not be answered; it gets its row with ``reason``."""
        self.in_flight.pop(mid, None)
        self._replied.discard(mid)
        self._ledger.add(mid)
        job.node.busy = False
        job.t_finish = self.now
        self._count_reason(reason)
        self._record(job, None, accepted=False, reason=reason)
        self.counters["jobs-abandoned"] += 1
        if not self._draining:
            self.strategy.on_job_failed(self, job, reason)
        self._gc_versions()

    def _candidate_keys(self) -> range:
        return range(max(len(self.nodes), 1))

    def _dispatch(self) -> None:
        if self._done():
            return
        idle = sorted(
            (n for n in self.nodes.values() if not n.busy and not n.retired),
            key=lambda n: n.ident,
        )
        if not idle:
            return
        decisions = self.strategy.configure_dispatch(self, idle)
        if not decisions:
            return
        _, arrays, nbytes = self._versions[self.version]
        messages, jobs = [], []
        for node, extra in decisions:
            cfg = {**self.train_config, **(extra or {}), "server-round": self.version}
            messages.append(self._train_message(node.node_id, arrays, cfg))
            steps = cfg.get("local-steps")
            sent_steps = int(steps) if steps is not None and int(steps) > 0 else None
            jobs.append((node, dict(extra or {}), sent_steps))
        msg_ids = list(self.grid.push_messages(messages))
        for msg, (node, extra, sent_steps) in zip(messages, jobs, strict=True):
            mid = msg.metadata.message_id
            if not mid or mid not in msg_ids:
                node.failures += 1
                self._count_reason("push failed")
                continue
            lb = self.now
            if isinstance(self.clock, VirtualClock):
                lb += self.clock.lower_bound(
                    node.key,
                    node.jobs,
                    nbytes,
                    sent_steps or self.clock.profile.min_steps,
                    self._candidate_keys(),
                )
            job = Job(
                node=node,
                job_index=node.jobs,
                version=self.version,
                msg_id=mid,
                extra=extra,
                sent_steps=sent_steps,
                t_dispatch=self.now,
                wall_dispatch=time.monotonic(),
                bytes_down=nbytes,
                lower_bound=lb,
            )
            node.jobs += 1
            node.busy = True
            self.in_flight[mid] = job
            self.counters["jobs-dispatched"] += 1

    def _pull(self) -> int:
        pending = [m for m in self.in_flight if m not in self._replied]
        if not pending:
            return 0
        replies = list(self.grid.pull_messages(pending))
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            job = self.in_flight.get(mid)
            if job is None and mid not in self._ledger:
                self.counters["unknown-replies"] += 1
                self._count_reason("reply to a message never sent")
                log(WARNING, "Dropped a reply to message %r, which this server never sent", mid)
                continue
            if job is None or mid in self._replied:
                self.counters["duplicate-replies"] += 1
                self._count_reason("reply to a message already processed")
                log(WARNING, "Dropped a second reply to message %r", mid)
                continue
            self._replied.add(mid)
            self._on_reply(job, reply)
        return len(replies)

    def _on_reply(self, job: Job, reply: Message) -> None:
        """Turn a reply into an event at its (virtual or wall) finish time."""
        if reply.has_error():
            t = job.lower_bound if self.clock.is_virtual else self.now
            code = reply.error.code
            reason = f"{_ERROR_NAMES.get(code, f'error {code}')}: {reply.error.reason}"
            self._push_event(t, 0, job.node.ident, job.job_index, ("error", job, reason))
            return
        if reply.metadata.message_type != MessageType.TRAIN:
            t = job.lower_bound if self.clock.is_virtual else self.now
            reason = f"unexpected message type: {reply.metadata.message_type!r}"
            self._push_event(t, 0, job.node.ident, job.job_index, ("reject", job, reason))
            return
        content = reply.content
        metrics = next(iter(content.metric_records.values()), MetricRecord())
        if "partition-id" in metrics and job.node.key is None:
            job.node.key = int(metrics["partition-id"])
        bytes_up = sum(r.count_bytes() for r in content.array_records.values())
        steps = metrics.get("num-steps")
        steps = int(steps) if isinstance(steps, (int, float)) and steps > 0 else None
        steps = steps or job.sent_steps
        if isinstance(self.clock, VirtualClock):
            steps = steps or self.clock.profile.default_steps
            timing = self.clock.timing(
                job.node.ident, job.job_index, job.bytes_down, bytes_up, steps
            )
            t = job.t_dispatch + timing.total
            if t < job.lower_bound:
                self.counters["clock-violations"] += 1
                t = job.lower_bound
        else:
            t = self.now
        self._push_event(t, 0, job.node.ident, job.job_index, ("reply", job, reply, bytes_up))

    def _push_event(self, t: float, cls: int, ident: int, sub: int, payload: tuple) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, cls, ident, sub, self._seq, payload))

    def _min_lower_bound(self) -> float:
        bounds = [j.lower_bound for m, j in self.in_flight.items() if m not in self._replied]
        return min(bounds, default=math.inf)

    def _process_ready(self) -> int:
        handled = 0
        while self._events and not self._done():
            t = self._events[0][0]
            if self.clock.is_virtual:
                # strict: an unreplied job whose lower bound equals t could tie with it
                if t >= self._min_lower_bound():
                    break
                if t > self.max_time:
                    self.clock.advance(self.max_time)
                    break
            elif t > self.now:
                break
            *_, payload = heapq.heappop(self._events)
            self.clock.advance(t)
            self._handle_event(payload)
            handled += 1
            self._dispatch()
            self._maybe_checkpoint()
        return handled

    def _handle_event(self, payload: tuple) -> None:
        """Handle one event; its thread CPU time (minus evaluation) is the engine's own cost."""
        c0, e0 = time.thread_time(), self._eval_cpu
        kind = payload[0]
        if kind == "timer":
            if not payload[1].cancelled and not self._draining:
                self.strategy.on_timer(self, payload[1])
        elif kind == "error":
            self._handle_error(payload[1], payload[2])
        elif kind == "reject":
            self._reject(payload[1], payload[2], 0)
        else:
            self._handle_reply(payload[1], payload[2], payload[3])
        self._handle_cpu += time.thread_time() - c0 - (self._eval_cpu - e0)

    def _finish_job(self, job: Job) -> None:
        self.in_flight.pop(job.msg_id, None)
        self._replied.discard(job.msg_id)
        self._ledger.add(job.msg_id)
        job.node.busy = False
        job.t_finish = self.now

    def _fail(self, job: Job, reason: str, *, error: bool) -> None:
        node = job.node
        node.failures += 1
        self.counters["error-replies" if error else "updates-rejected"] += 1
        self._count_reason(reason)
        log(WARNING, "Job %d of node %d failed: %s", job.job_index, node.ident, reason)
        if node.failures >= self.max_failures and not node.retired:
            self._retire(node, f"{node.failures} consecutive failures")
        if not self._draining:
            self.strategy.on_job_failed(self, job, reason)

    def _handle_error(self, job: Job, reason: str) -> None:
        self._finish_job(job)
        self._record(job, None, accepted=False, reason=reason)
        self._fail(job, reason, error=True)
        self._gc_versions()

    def _reject(self, job: Job, reason: str, bytes_up: int, num_examples: float = 0.0) -> None:
        """A reply that is not a valid update: recorded, counted, never aggregated."""
        if job.msg_id in self.in_flight:
            self._finish_job(job)
            self.counters["updates-received"] += 1
        rec = self._record(job, None, accepted=False, reason=reason, bytes_up=bytes_up)
        rec.num_examples = num_examples
        self._fail(job, reason, error=False)
        self._gc_versions()

    def _handle_reply(self, job: Job, reply: Message, bytes_up: int) -> None:
        self._finish_job(job)
        self.counters["updates-received"] += 1
        if self.max_reply_bytes and bytes_up > self.max_reply_bytes:
            reason = f"reply too large: {bytes_up} bytes > max-reply-bytes {self.max_reply_bytes}"
            self._reject(job, reason, bytes_up)
            return
        base_params, base_arrays, _ = self._versions[job.version]
        params, num_examples, metrics, reason = extract_reply(
            reply.content, base_params, base_arrays, self.strategy.weighted_by_key
        )
        steps = metrics.get("num-steps", job.sent_steps)
        if params is None:
            self._reject(job, reason, bytes_up, num_examples)
            return
        job.node.failures = 0
        self.counters["updates-accepted"] += 1
        update = Update(
            job=job,
            params=params,
            base=base_params,
            num_examples=num_examples,
            metrics=metrics,
            num_steps=int(steps) if steps else 0,
            t_finish=self.now,
            bytes_up=bytes_up,
            staleness=self.version - job.version,
        )
        update.record = self._record(job, update, accepted=True, reason="", bytes_up=bytes_up)
        if self._draining:
            self.discard(update, "reply after the run ended")
        else:
            self.strategy.on_update(self, update)
        self._gc_versions()

    def _check_job_timeouts(self) -> None:
        now = time.monotonic()
        for mid, job in list(self.in_flight.items()):
            if mid not in self._replied and now - job.wall_dispatch > self.job_timeout:
                self.counters["job-timeouts"] += 1
                job.node.failures += 1
                if job.node.failures >= self.max_failures and not job.node.retired:
                    self._retire(job.node, "repeated timeouts")
                self._abandon(mid, job, "job timeout")

    def _record(
        self,
        job: Job,
        update: Update | None,
        *,
        accepted: bool,
        reason: str,
        bytes_up: int = 0,
    ) -> UpdateRecord:
        rec = UpdateRecord(
            time=float(self.now),
            wall_time=float(time.monotonic() - self._wall0),
            node=int(job.node.ident),
            node_id=int(job.node.node_id),
            job=int(job.job_index),
            version_sent=int(job.version),
            server_version=int(self.version),
            staleness=int(self.version - job.version),
            accepted=accepted,
            reason=reason,
            num_examples=float(update.num_examples) if update else 0.0,
            num_steps=int(update.num_steps) if update else 0,
            duration=float(self.now - job.t_dispatch),
            bytes_down=int(job.bytes_down),
            bytes_up=int(bytes_up),
            msg_id=str(job.msg_id),
            valid=accepted,
        )
        self.result.updates.append(rec)
        return rec

    def _count_reason(self, reason: str) -> None:
        short = reason.split(":")[0]
        self.reasons[short] = self.reasons.get(short, 0) + 1

    def _store_version(
        self, version: int, params: dict[str, np.ndarray], arrays: ArrayRecord | None = None
    ) -> None:
        if arrays is None:
            arrays = ArrayRecord({k: _as_array(v) for k, v in params.items()})
        self._versions[version] = (params, arrays, arrays.count_bytes())

    def _gc_versions(self) -> None:
        needed = {self.version} | {j.version for j in self.in_flight.values()}
        for v in [v for v in self._versions if v not in needed]:
            del self._versions[v]

    def _evaluate(self) -> None:
        if self.evaluate_fn is None:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        _, arrays, _ = self._versions[self.version]
        res = self.evaluate_fn(self.version, arrays)
        self._eval_time += time.perf_counter() - t0
        self._eval_cpu += time.thread_time() - c0
        if res is None:
            return
        res = MetricRecord(dict(res))
        res["time"] = float(self.now)
        res["wall-time"] = float(time.monotonic() - self._wall0)
        res["updates-applied"] = int(self.counters["updates-applied"])
        self.result.evaluate_metrics_serverapp[self.version] = res
        log(INFO, "[version %d, t=%.2f] %s", self.version, self.now, dict(res))

    def _finish(self) -> AsyncResult:
        self.result.arrays = self._versions[self.version][1]
        applied = [r.staleness for r in self.result.updates if r.applied_in >= 0]
        applied_n = int(self.counters["updates-applied"])
        self.result.counters = {
            **{k: float(v) for k, v in self.counters.items()},
            "versions": float(self.version),
            "final-time": float(self.now),
            "wall-time": float(time.monotonic() - self._wall0),
            "server-overhead-s": float(self._overhead),
            "server-cpu-s": float(self._loop_cpu),
            "engine-cpu-s": float(self._handle_cpu),
            "engine-cpu-ms-per-update": (
                1000.0 * self._handle_cpu / applied_n if applied_n else float("nan")
            ),
            "evaluate-s": float(self._eval_time),
            "evaluate-cpu-s": float(self._eval_cpu),
            "mean-staleness": float(np.mean(applied)) if applied else 0.0,
        }
        self.result.reasons = dict(self.reasons)
        self.result.stop_reason = self._stop_reason
        log(
            INFO,
            "%s finished (%s): %s",
            type(self.strategy).__name__,
            self._stop_reason,
            {k: v for k, v in self.result.counters.items() if v},
        )
        if self.reasons:
            log(INFO, "Failure reasons: %s", self.reasons)
        return self.result


def _as_array(v: np.ndarray):
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def _mean_metrics(updates: list[Update]) -> dict[str, float]:
    """Sample-weighted mean of the scalar client metrics of ``updates``."""
    skip = {"num-examples", "partition-id"}
    tot = sum(u.num_examples for u in updates) or 1.0
    out: dict[str, float] = {}
    for u in updates:
        for k, v in u.metrics.items():
            if k in skip or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            out[k] = out.get(k, 0.0) + float(v) * u.num_examples / tot
    out["num-examples"] = float(sum(u.num_examples for u in updates))
    return out


def _clock_name(clock: Any) -> str:
    return "virtual" if getattr(clock, "is_virtual", False) else "wall"
