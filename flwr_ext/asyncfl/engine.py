"""The asynchronous event loop on Flower's Grid: dispatch, pull, hand events to the strategy.

:class:`AsyncEngine` drives an :class:`~flwr_ext.asyncfl.strategy.AsyncStrategy` with
``grid.push_messages`` / ``grid.pull_messages`` only (no round barrier). Its parts each do one
job (docs/asyncfl.md has the design notes):

* :mod:`~flwr_ext.asyncfl.nodes` — who is connected, idle, retired (the one retirement rule),
* :mod:`~flwr_ext.asyncfl.jobs` — the jobs in flight, their lower bounds and timeouts,
* :mod:`~flwr_ext.asyncfl.events` — completions and timers ordered on the clock,
* :mod:`~flwr_ext.asyncfl.intake` — the reply gate: ledger, checks, one decode,
* :mod:`~flwr_ext.asyncfl.versions` — model versions kept while something needs them,
* :mod:`~flwr_ext.asyncfl.records` — per-update rows, counters, the cost meter,
* :mod:`~flwr_ext.asyncfl.resume` — checkpoints and resuming.

This module is the loop that ties them together and the :class:`~flwr_ext.asyncfl.types.
EngineAPI` that strategies call.
"""

from __future__ import annotations

import math
import random
import time
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_ext.arrays import record_to_numpy
from flwr_ext.asyncfl import resume
from flwr_ext.asyncfl.clock import RealClock, VirtualClock
from flwr_ext.asyncfl.events import (
    EventQueue,
    JobErrored,
    ReplyArrived,
    ReplyRefused,
    TimerDue,
)
from flwr_ext.asyncfl.intake import (
    IDENTITY_KEYS,
    Accepted,
    Intake,
    Reason,
    describe,
    partition_id,
    reply_metrics,
)
from flwr_ext.asyncfl.jobs import InFlight
from flwr_ext.asyncfl.nodes import NodeRegistry
from flwr_ext.asyncfl.options import EngineOptions
from flwr_ext.asyncfl.records import COUNTERS, AsyncResult, CostMeter, UpdateRecord
from flwr_ext.asyncfl.strategy import AsyncStrategy, EvaluateFn
from flwr_ext.asyncfl.types import Job, NodeState, Params, Timer, Update
from flwr_ext.asyncfl.versions import VersionStore
from flwr_ext.compression.downlink import (
    KEY_VERSION,
    REPLY_RECORD,
    DownlinkState,
    Send,
    server_confirm,
    server_send,
    server_unconfirm,
)
from flwr_ext.compression.hints import DECODER_KEY

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
#: Errors that are no fault of the node (its message waited in a queue too long).
#: At most ``timeout * 2**MAX_BACKOFF_DOUBLINGS`` s of rest after expired messages.
MAX_BACKOFF_DOUBLINGS = 5
#: Seconds the warm-up waits for its probes to be answered (their TTL), at least.
WARMUP_WAIT = 300.0
#: Counter of each kind of downlink send (the names the ``Compressed`` wrapper reports).
DOWNLINK_COUNTERS = {
    Send.COMPRESSED: "downlink-compressed",
    Send.INITIAL: "downlink-compressed",
    Send.NEW: "downlink-new",
    Send.UNCONFIRMED: "downlink-resynced",
}
_NOT_CHARGED = {
    _ERROR_NAMES[ErrorCode.MESSAGE_UNAVAILABLE],
    _ERROR_NAMES[ErrorCode.REPLY_MESSAGE_UNAVAILABLE],
}


class AsyncEngine:
    """Event loop on a Flower Grid (see the module docstring and docs/asyncfl.md).

    Parameters
    ----------
    strategy : AsyncStrategy
    grid : Grid
        Flower's Grid (or anything with ``get_node_ids``, ``push_messages``, ``pull_messages``).
    clock : VirtualClock or RealClock
    options : EngineOptions
    train_config : ConfigRecord, optional
        Sent with every job (plus ``server-round`` = the model version sent).
    evaluate_fn : callable, optional
        ``(version, arrays) -> MetricRecord | None``, called on the versions due.
    """

    def __init__(
        self,
        strategy: AsyncStrategy,
        grid: Grid,
        *,
        clock: VirtualClock | RealClock,
        options: EngineOptions,
        train_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> None:
        self.strategy = strategy
        self.grid = grid
        self.clock = clock
        self.options = options
        # the engine decodes compressed replies: say so, or compression_mod refuses to encode
        self.train_config = {**dict(train_config or {}), DECODER_KEY: True}
        self.evaluate_fn = evaluate_fn
        self.registry = NodeRegistry(options.max_failures)
        self.jobs = InFlight()
        self.queue = EventQueue()
        self.versions = VersionStore()
        self.intake = Intake(
            strategy.weighted_by_key,
            options.max_reply_bytes,
            options.replies_are_deltas,
            options.max_count_ratio,
        )
        self.result = AsyncResult()
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self.reasons: dict[str, int] = {}
        self.cost = CostMeter()
        self.version = 0
        self.timers_seq = 0
        self.next_eval = options.eval_period
        self.last_checkpoint = 0
        self.stop_reason = ""
        self._draining = False
        self._spec: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        self._wall0 = time.monotonic()
        self._last_node_poll = self._wall0
        #: EF21-P shadows per node (``None``: the model is sent as it is)
        self.downlink = (
            None
            if options.downlink is None
            else DownlinkState(options.downlink, seed=options.downlink_seed)
        )
        if self.downlink is not None:
            for name in (*dict.fromkeys(DOWNLINK_COUNTERS.values()), "downlink-bytes"):
                self.counters[name] = 0
        # Jobs keep their model version only if the reply may need it to become a delta or weights
        # (with downlink the delta is taken against the node's shadow, but a resume re-sends x_v)
        self._jobs_hold_versions = strategy.needs_weights or not options.replies_are_deltas
        # one stream for the concurrency cap's draws, seeded once; saved in checkpoints
        self._resting: dict[str, tuple[NodeState, float]] = {}  # timed-out msg id -> node, until
        self._backoff: dict[int, tuple[NodeState, float]] = {}  # node id -> node, until
        self.sampler = random.Random(
            int(np.random.SeedSequence([options.sampler_seed, 7]).generate_state(1)[0])
        )

    # ------------------------------------------------------------------ EngineAPI
    @property
    def now(self) -> float:
        """Current clock time (virtual, or wall seconds since the run started)."""
        return self.clock.now

    @property
    def params(self) -> Params:
        """The current global model (read-only arrays)."""
        return self.versions[self.version].params

    @property
    def nodes(self) -> dict[int, NodeState]:
        """Known nodes by Flower node id."""
        return self.registry.nodes

    @property
    def in_flight(self) -> dict[str, Job]:
        """Jobs in flight by message id."""
        return self.jobs.jobs

    @property
    def num_rounds(self) -> int:
        """Server model versions to reach."""
        return self.options.num_rounds

    def model_at(self, version: int) -> Params:
        """Arrays of model ``version`` (kept while a job in flight was sent it)."""
        return self.versions[version].params

    def set_timer(self, at: float, payload: Any = None) -> Timer:
        """Call ``strategy.on_timer`` at clock time ``at`` (not before ``now``)."""
        self.timers_seq += 1
        timer = Timer(max(float(at), self.now), self.timers_seq, payload)
        self.queue.push_timer(timer)
        return timer

    def cancel_timer(self, timer: Timer) -> None:
        """Cancel a timer that has not fired."""
        timer.cancelled = True

    def discard(self, update: Update, reason: str, detail: str = "") -> None:
        """Record ``update`` as not applied; ``reason`` is counted, ``detail`` only recorded."""
        self.counters["updates-discarded"] += 1
        self._count(reason)
        if update.record is not None:
            update.record.accepted = False
            update.record.reason = describe(reason, detail)

    def commit(
        self, params: Params, updates: list[Update], metrics: dict[str, float] | None = None
    ) -> int:
        """Make ``params`` the new global model (one server update) from ``updates``.

        Returns the new version. Evaluates it when due (``eval_every`` / ``eval_period``).
        """
        self.version += 1
        self.versions.put(self.version, params)
        self._release_too_stale()
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
        period = self.options.eval_period
        if period > 0:
            due = now >= self.next_eval
            if due:
                self.next_eval = (math.floor(now / period) + 1) * period
        else:
            due = self.version % self.options.eval_every == 0
        if due or self.version >= self.options.num_rounds:
            self._evaluate()
        return self.version

    # ------------------------------------------------------------------ the run
    def run(self, initial_arrays: ArrayRecord) -> AsyncResult:
        """Run the strategy; return the result (see :class:`AsyncResult`).

        With ``options.resume_from`` the run continues from that checkpoint and
        ``initial_arrays`` is ignored.
        """
        kind = "virtual" if self.clock.is_virtual else "wall"
        log(INFO, "Starting %s on %s clock", type(self.strategy).__name__, kind)
        self.strategy.summary()
        self.clock.reset()
        self._wall0 = time.monotonic()
        if self.options.resume_from:
            resume.restore(self, resume.load(self.options.resume_from))
        else:
            self.versions.put(0, record_to_numpy(initial_arrays), initial_arrays)
            self.set_model_spec(self.params)
            self.result.arrays = initial_arrays
            self.wait_for_nodes()
            if self.options.warmup:
                self.warm_up()
            # the clock and the wall-time budget start once the nodes are there
            self.clock.reset()
            self._wall0 = time.monotonic()
            self._evaluate()
            self.strategy.on_start(self)
        self._last_node_poll = time.monotonic()
        while not self._check_done():
            self._maybe_poll_nodes()
            t0, c0 = time.perf_counter(), time.thread_time()
            e0, ec0 = self.cost.eval_time, self.cost.eval_cpu
            self.dispatch()
            got = self._pull()
            self._check_timeouts()
            handled = self._process_ready()
            # evaluation is not server overhead
            self.cost.overhead += time.perf_counter() - t0 - (self.cost.eval_time - e0)
            self.cost.loop_cpu += time.thread_time() - c0 - (self.cost.eval_cpu - ec0)
            if self._check_done():
                break
            if self._stalled():
                self.stop_reason = "stalled: no job in flight, no timer, nothing dispatched"
                log(WARNING, "AsyncEngine %s", self.stop_reason)
                break
            if not got and not handled:
                time.sleep(self.options.poll_interval)
        self.strategy.on_finish(self)
        if self.version not in self.result.evaluate_metrics_serverapp:
            self._evaluate()
        self._drain()
        self._record_unfinished()
        return self._finish()

    def set_model_spec(self, params: Params) -> None:
        """Names, shapes and dtypes every reply must match (fixed for the run)."""
        self._spec = {k: (tuple(v.shape), v.dtype) for k, v in params.items()}

    def wait_for_nodes(self) -> None:
        """Poll until ``min_nodes`` nodes are connected (or the wall timeout)."""
        while True:
            self.poll_nodes()
            if len(self.registry) >= self.options.min_nodes:
                return
            if self._wall_expired():
                return
            log(INFO, "Waiting for nodes: %d of %d", len(self.registry), self.options.min_nodes)
            time.sleep(1.0)

    def probe(
        self,
        node_ids: list[int],
        *,
        need: int | None = None,
        counter: str = "probe-jobs",
        wait: float | None = None,
    ) -> dict[int, int]:
        """One short job per node (``local-steps = 1``, ``flwr-ext-identify = 1``).

        Replies are read only for their ``partition-id`` (no update, no event, no row). Waits
        until every node answered, or ``need`` of them, or ``wait`` wall seconds (default
        ``min(timeout, 600)``); the probe messages live that long too (their TTL), so a
        ClientApp that is still starting can answer them.
        Returns ``node id -> partition-id`` of the nodes that reported one.
        """
        wait = min(self.options.timeout, 600.0) if wait is None else wait
        arrays = self.versions[self.version].arrays
        cfg = {**self.train_config, "server-round": self.version, "local-steps": 1}
        cfg["flwr-ext-identify"] = 1
        ttl = max(self.options.timeout, wait)
        msgs = [self.train_message(nid, arrays, cfg, ttl=ttl) for nid in node_ids]
        ids = set(self.grid.push_messages(msgs))
        want = {m.metadata.message_id: nid for m, nid in zip(msgs, node_ids, strict=True)}
        want = {mid: nid for mid, nid in want.items() if mid in ids}
        self.counters[counter] = self.counters.get(counter, 0) + len(want)
        keys: dict[int, int] = {}
        answered = 0
        goal = len(want) if need is None else min(need, len(want))
        deadline = time.monotonic() + wait
        while want and answered < goal and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(want)):
                nid = want.pop(reply.metadata.reply_to_message_id, None)
                if nid is None or reply.has_error():
                    continue
                answered += 1
                pid = partition_id(reply.content)
                if pid is not None:
                    keys[nid] = pid
            if want and answered < goal:
                time.sleep(self.options.poll_interval)
        return keys

    def warm_up(self) -> None:
        """Before the clock starts: one short job per node, until ``min_nodes`` answered.

        The Simulation Engine can take a minute to start its ClientApps; without a warm-up a
        wall-clock budget is mostly spent waiting for them. Nodes learn their identity too.
        The probes wait (and live) up to :data:`WARMUP_WAIT` s, or ``timeout`` if longer (at
        most 600 s), whatever the job timeout: a short timeout must not expire them while Ray
        starts.
        """
        t0 = time.monotonic()
        nodes = list(self.registry.nodes.values())
        wait = min(max(self.options.timeout, WARMUP_WAIT), 600.0)
        keys = self.probe([n.node_id for n in nodes], need=self.options.min_nodes, wait=wait)
        for node in nodes:
            if node.node_id in keys:
                self.registry.set_key(node, keys[node.node_id])
        log(
            INFO,
            "Warm-up: %d of %d nodes answered in %.1f s",
            len(keys),
            len(nodes),
            time.monotonic() - t0,
        )

    def _stop_reason_now(self) -> str:
        """Why the run should stop now (``""``: it should not). Changes nothing."""
        if self.version >= self.options.num_rounds:
            return "num_rounds reached"
        if self.clock.now >= self.options.max_time:
            return "max_time reached"
        if self._wall_expired():
            return "wall timeout"
        if not self.registry.num_active:
            return "no active nodes"
        return ""

    def _check_done(self) -> bool:
        reason = self._stop_reason_now()
        if reason and not self.stop_reason:
            self.stop_reason = reason
        return bool(reason)

    def _wall_expired(self) -> bool:
        wall = self.options.wall_timeout
        return wall is not None and time.monotonic() - self._wall0 > wall

    def _stalled(self) -> bool:
        return (
            self.clock.is_virtual
            and not self.jobs
            and not self.queue
            and self.registry.num_idle > 0
        )

    # ------------------------------------------------------------------ dispatch
    def dispatch(self) -> None:
        """Offer idle nodes (at most the free slots under ``max_concurrency``) to the strategy."""
        if self._stop_reason_now() or not self.registry.num_idle:
            return
        cap = self.options.max_concurrency
        if cap:
            free = cap - len(self.jobs)
            if free <= 0:
                return
            idle = self._sample_idle(free)
        else:
            idle = self.registry.idle()
        decisions = self.strategy.configure_dispatch(self, idle)
        if cap:
            decisions = decisions[:free]
        if decisions:
            self.send(decisions, self.version)

    def _sample_idle(self, k: int) -> list[NodeState]:
        """``k`` idle nodes drawn uniformly by the engine's seeded sampler."""
        n = self.registry.num_idle
        if n <= k:
            return self.registry.idle()
        return self.registry.idle_at(sorted(self.sampler.sample(range(n), k)))

    def send(self, decisions: list[tuple[NodeState, dict[str, Any]]], version: int) -> None:
        """Push one train job per ``(node, extra config)`` with model ``version``."""
        v = self.versions[version]
        messages, pending = [], []
        for node, extra in decisions:
            cfg = {**self.train_config, **(extra or {}), "server-round": version}
            if self.downlink is None:
                messages.append(self.train_message(node.node_id, v.arrays, cfg))
                shadow, nbytes = None, v.nbytes
            else:
                msg, shadow, nbytes = self.downlink_message(node.node_id, v.params, cfg)
                messages.append(msg)
            steps = cfg.get("local-steps")
            sent_steps = int(steps) if steps is not None and int(steps) > 0 else None
            pending.append((node, dict(extra or {}), sent_steps, shadow, nbytes))
        msg_ids = set(self.grid.push_messages(messages))
        for msg, (node, extra, sent_steps, shadow, nbytes) in zip(messages, pending, strict=True):
            mid = msg.metadata.message_id
            if not mid or mid not in msg_ids:
                self._count(Reason.PUSH_FAILED)
                self.registry.failed(node, Reason.PUSH_FAILED)
                continue
            lb = self.now
            if self.clock.is_virtual:
                lb += self.clock.lower_bound(
                    node.key,
                    node.jobs,
                    nbytes,
                    sent_steps or self.clock.profile.min_steps,
                    max(len(self.registry), 1),
                )
            job = Job(
                node=node,
                job_index=node.jobs,
                version=version,
                msg_id=mid,
                extra=extra,
                sent_steps=sent_steps,
                t_dispatch=self.now,
                wall_dispatch=time.monotonic(),
                bytes_down=nbytes,
                lower_bound=lb,
                shadow=shadow,
            )
            if shadow is not None:
                self.counters["downlink-bytes"] += nbytes
            node.jobs += 1
            self.start_job(job)
            self.counters["jobs-dispatched"] += 1

    def downlink_message(
        self, node_id: int, x: Params, cfg: dict[str, Any]
    ) -> tuple[Message, Params, int]:
        """The EF21-P train message to ``node_id`` for model ``x``: ``C(x - w_i)``, or ``x``
        densely to a node whose shadow is not confirmed; with the shadow the node will train
        from and the message's ArrayRecord bytes. The node's shadow advances now."""
        assert self.downlink is not None
        down = server_send(self.downlink, node_id, x)
        self.counters[DOWNLINK_COUNTERS[down.kind]] += 1
        msg = self.train_message(node_id, down.record, {**cfg, **down.config})
        return msg, down.shadow, down.record.count_bytes()

    def _confirm_downlink(self, job: Job, reply: Message) -> tuple[Reason, str] | None:
        """Confirm the node's shadow from its reply; ``None`` if it holds the one sent."""
        assert self.downlink is not None
        rec = reply.content.config_records.get(REPLY_RECORD)
        if rec is None or KEY_VERSION not in rec:
            return Reason.NO_DOWNLINK_RECORD, ""
        version = int(rec[KEY_VERSION])  # type: ignore[arg-type]
        if not server_confirm(self.downlink, job.node.node_id, version):
            return Reason.DOWNLINK_VERSION, f"node holds {version}"
        return None

    def start_job(self, job: Job) -> None:
        """``job`` was pushed: it is in flight, its node busy, its version held if needed."""
        self.registry.mark_busy(job.node)
        self.jobs.add(job)
        if self._jobs_hold_versions:
            self.versions.acquire(job.version)

    def train_message(
        self, node_id: int, arrays: ArrayRecord, cfg: dict[str, Any], ttl: float | None = None
    ) -> Message:
        """A train instruction as Flower's FedAvg builds it (TTL: the job timeout by default)."""
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
            ttl=self.options.timeout if ttl is None else ttl,
        )

    # ------------------------------------------------------------------ pull and order
    def _pull(self) -> int:
        pending = self.jobs.unreplied_ids() + list(self._resting)
        if not pending:
            return 0
        replies = list(self.grid.pull_messages(pending))
        for reply in replies:
            mid = reply.metadata.reply_to_message_id
            if mid in self._resting:
                self._late_reply(mid)
                continue
            job = self.jobs.get(mid)
            if job is None or not self.jobs.replied(mid):
                reason = (
                    Reason.DUPLICATE_REPLY
                    if job is not None
                    else (self.intake.unpaired_reason(mid))
                )
                name = "duplicate" if reason is Reason.DUPLICATE_REPLY else "unknown"
                self.counters[f"{name}-replies"] += 1
                self._count(reason)
                log(WARNING, "Dropped a reply to message %r: %s", mid, reason)
                continue
            self._on_reply(job, reply)
        return len(replies)

    def _on_reply(self, job: Job, reply: Message) -> None:
        """Turn a reply into an event at its (virtual or wall) finish time."""
        virtual = self.clock.is_virtual
        if reply.has_error():
            code = reply.error.code
            kind = _ERROR_NAMES.get(code, f"error {code}")
            t = job.lower_bound if virtual else self.now
            self.queue.push_completion(t, JobErrored(job, kind, describe(kind, reply.error.reason)))
            return
        if reply.metadata.message_type != MessageType.TRAIN:
            reason = describe(Reason.WRONG_TYPE, repr(reply.metadata.message_type))
            t = job.lower_bound if virtual else self.now
            self.queue.push_completion(t, ReplyRefused(job, reason))
            return
        content = reply.content
        pid = partition_id(content)
        if pid is not None and job.node.key is None:
            self.registry.set_key(job.node, pid)
        bytes_up = sum(r.count_bytes() for r in content.array_records.values())
        if virtual:
            steps = reply_metrics(content).get("num-steps")
            steps = int(steps) if isinstance(steps, int | float) and steps > 0 else None
            steps = steps or job.sent_steps or self.clock.profile.default_steps
            timing = self.clock.timing(
                job.node.ident, job.job_index, job.bytes_down, bytes_up, steps
            )
            t = job.t_dispatch + timing.total
            if t < job.lower_bound:
                self.counters["clock-violations"] += 1
                t = job.lower_bound
        else:
            t = self.now
        self.queue.push_completion(t, ReplyArrived(job, reply, bytes_up))

    def _process_ready(self) -> int:
        handled = 0
        while self.queue and not self._check_done():
            if self.clock.is_virtual:
                horizon = self.jobs.min_lower_bound()
                t = self.queue.next_time()
                # strict: an unreplied job whose lower bound equals t could tie with it
                if t >= horizon:
                    break
                if t > self.options.max_time:
                    self.clock.advance(self.options.max_time)
                    break
                t, event = self.queue.pop()
            else:
                item = self.queue.pop_ready(self.now, strict=False)
                if item is None:
                    break
                t, event = item
            self.clock.advance(t)
            self._handle(event)
            handled += 1
            self.dispatch()
            resume.maybe_checkpoint(self)
        return handled

    def _handle(self, event) -> None:
        """Handle one event; its thread CPU time (minus evaluation) is the engine's own cost."""
        c0, e0 = time.thread_time(), self.cost.eval_cpu
        if isinstance(event, TimerDue):
            if not event.timer.cancelled and not self._draining:
                self.strategy.on_timer(self, event.timer)
        elif isinstance(event, JobErrored):
            # an expired TTL says the message waited (behind someone else) or outlived its TTL
            # while its ClientApp ran, not that this node failed: counted, never charged toward
            # its retirement; the node backs off instead of getting a new job at once
            expired = event.kind in _NOT_CHARGED
            self._end_job(event.job, free=not expired)
            self._record(event.job, None, accepted=False, reason=event.reason)
            if expired:
                self._back_off(event.job.node)
            self._failed(event.job, event.kind, event.reason, error=True, charge=not expired)
        elif isinstance(event, ReplyRefused):
            self._end_job(event.job)
            self.counters["updates-received"] += 1
            self._record(event.job, None, accepted=False, reason=event.reason)
            self._failed(event.job, Reason.WRONG_TYPE, event.reason, error=False)
        else:
            self._handle_reply(event)
        self.cost.handle_cpu += time.thread_time() - c0 - (self.cost.eval_cpu - e0)

    # ------------------------------------------------------------------ ends of jobs
    def _end_job(self, job: Job, *, free: bool = True) -> Params | None:
        """The job ended; return the model it was sent if it was held for it.

        ``free=False`` keeps the node busy (a timed-out job may still be running there).
        """
        base = None
        if self._jobs_hold_versions and job.version in self.versions:
            base = self.versions[job.version].params
        held = self.jobs.get(job.msg_id) is job if job.msg_id else False
        self.jobs.remove(job)
        self.intake.close(job.msg_id)
        if job.shadow is not None:  # unconfirmed until its reply says otherwise: dense next
            server_unconfirm(self.downlink, job.node.node_id)  # type: ignore[arg-type]
        if free:
            self.registry.mark_free(job.node)
        job.t_finish = self.now
        if held and self._jobs_hold_versions and not job.released:
            self.versions.release(job.version)
        return base

    def _failed(
        self, job: Job, kind: str, reason: str, *, error: bool, charge: bool = True
    ) -> None:
        """An error reply or a refused reply: counted under ``kind``, charged to its node."""
        self.counters["error-replies" if error else "updates-rejected"] += 1
        self._count(kind)
        log(WARNING, "Job %d of node %d failed: %s", job.job_index, job.node.ident, reason)
        if charge:
            self.registry.failed(job.node, reason)
        if not self._draining:
            self.strategy.on_job_failed(self, job, reason)

    def _handle_reply(self, event: ReplyArrived) -> None:
        job = event.job
        base = self._end_job(job)
        self.counters["updates-received"] += 1
        shadow = job.shadow
        if shadow is not None and (bad := self._confirm_downlink(job, event.reply)) is not None:
            why = describe(*bad)
            self._record(job, None, accepted=False, reason=why, bytes_up=event.bytes_up)
            self._failed(job, bad[0], why, error=False)
            return
        res = self.intake.check(
            event.reply,
            event.bytes_up,
            self._spec,
            self.versions[self.version].nbytes,
            base if shadow is None else shadow,
        )
        if not isinstance(res, Accepted):
            rec = self._record(job, None, accepted=False, reason=str(res), bytes_up=event.bytes_up)
            rec.num_examples = res.num_examples
            self._failed(job, res.reason, str(res), error=False)
            return
        self.registry.succeeded(job.node)
        steps = res.metrics.get("num-steps", job.sent_steps)
        delta, params = res.delta, res.params
        if shadow is not None and params is not None:
            # the node trained from its shadow w_i: its update is y - w_i, applied to x_v
            # (EF21-P); staleness stays the versions since v
            delta, params = {k: params[k] - shadow[k] for k in shadow}, None
        keep_base = params is not None or self.strategy.needs_weights
        update = Update(
            job=job,
            num_examples=res.num_examples,
            metrics=res.metrics,
            num_steps=int(steps) if steps else 0,
            t_finish=self.now,
            bytes_up=event.bytes_up,
            staleness=self.version - job.version,
            base=base if keep_base else None,
            _delta=delta,
            _params=params,
        )
        # updates-accepted counts every reply that passed the intake (rows with valid=True):
        # applied + discarded (a reply after the run ended among them) + held at the end
        self.counters["updates-accepted"] += 1
        if self._draining:  # valid, but the run is over: recorded, then discarded
            update.record = self._record(
                job, update, accepted=True, reason="", bytes_up=event.bytes_up
            )
            self.discard(update, Reason.AFTER_END)
            return
        update.record = self._record(job, update, accepted=True, reason="", bytes_up=event.bytes_up)
        self.strategy.on_update(self, update)

    def abandon(self, job: Job, reason: str, *, free: bool = True) -> None:
        """Give up on a job that will not be answered; it gets its row with ``reason``."""
        self._end_job(job, free=free)
        self._count(reason)
        self._record(job, None, accepted=False, reason=reason)
        self.counters["jobs-abandoned"] += 1
        if not self._draining:
            self.strategy.on_job_failed(self, job, reason)

    def _check_timeouts(self) -> None:
        """Give up on jobs past ``timeout``; their nodes rest until known to be free.

        A timed-out job may still be running on its node (a ClientApp cannot be interrupted):
        a new job sent now would queue behind it, and in the Simulation Engine keep a worker
        busy while other nodes' messages expire. So the node gets no job until its late reply
        comes (pulled and dropped) or another ``timeout`` has passed.
        """
        now = time.monotonic()
        for job in self.jobs.timed_out(now, self.options.timeout):
            self.counters["job-timeouts"] += 1
            self.registry.failed(job.node, Reason.JOB_TIMEOUT)
            self.abandon(job, Reason.JOB_TIMEOUT, free=False)
            if job.msg_id is not None:
                self._resting[job.msg_id] = (job.node, now + self.options.timeout)
        for mid, (node, until) in list(self._resting.items()):
            if now >= until:
                del self._resting[mid]
                self.registry.mark_free(node)
        for nid, (node, until) in list(self._backoff.items()):
            if now >= until:
                del self._backoff[nid]
                self.registry.mark_free(node)

    def _back_off(self, node: NodeState) -> None:
        """A message to ``node`` expired: it rests ``timeout * 2**k`` wall s before its next job.

        ``k`` counts its expired messages since its last valid reply (at most
        :data:`MAX_BACKOFF_DOUBLINGS` doublings). The Simulation Engine expires a message whose
        ClientApp runs past its TTL, and a SuperNode runs its messages one after another: a new
        job sent at once would expire in turn (measured: a node sleeping 3 s under a 1 s
        timeout got a new job every second, 12 in 13 s, each holding a ClientApp worker).
        """
        k = min(node.expired, MAX_BACKOFF_DOUBLINGS)
        node.expired += 1
        self._backoff[node.node_id] = (node, time.monotonic() + self.options.timeout * 2**k)

    def _late_reply(self, msg_id: str) -> None:
        """The reply of a job that timed out came: its node is free again."""
        node, _ = self._resting.pop(msg_id)
        self.counters["late-replies"] = self.counters.get("late-replies", 0) + 1
        self._count(Reason.LATE_REPLY)
        self.registry.mark_free(node)

    def _release_too_stale(self) -> None:
        """Jobs whose reply can no longer be applied (beyond ``max_staleness``) drop their model."""
        max_s = self.strategy.max_staleness
        if max_s is None or not self._jobs_hold_versions:
            return
        oldest = self.version - max_s
        for job in self.jobs.values():
            if job.version < oldest and not job.released:
                job.released = True
                self.versions.release(job.version)

    # ------------------------------------------------------------------ nodes
    def _maybe_poll_nodes(self) -> None:
        """:meth:`poll_nodes` at most every ``node_poll_interval`` wall seconds."""
        if time.monotonic() - self._last_node_poll > self.options.node_poll_interval:
            self.poll_nodes()
            self._last_node_poll = time.monotonic()

    def poll_nodes(self) -> None:
        """Register new nodes; retire vanished ones and give up on their jobs.

        Set operations only (no Python loop over all nodes): cheap with 10,000 nodes.
        """
        present = {int(n) for n in self.grid.get_node_ids()}
        known = self.registry.nodes.keys()
        for nid in sorted(present - known):
            self.registry.add(nid)
        after = self.options.readmit_after
        if after is not None:
            for node in self.registry.readmittable(time.monotonic() - after, present):
                self.registry.readmit(node)
                self.counters["nodes-readmitted"] = self.counters.get("nodes-readmitted", 0) + 1
        for nid in sorted(known - present):
            node = self.registry.nodes[nid]
            if node.retired:
                continue
            self.registry.retire(node, Reason.NODE_VANISHED, vanished=True)
            for job in [j for j in self.jobs.values() if j.node is node]:
                if self.jobs.awaiting_reply(job.msg_id):
                    self.abandon(job, Reason.NODE_VANISHED)

    # ------------------------------------------------------------------ end of the run
    def _drain(self) -> None:
        """After the run: wait (up to ``drain_timeout``) for the jobs still in flight.

        Each ends as it would during the run; a valid reply is recorded as "reply after the run
        ended" and not given to the strategy; the model does not change.
        """
        if not self.options.drain_timeout or not self.jobs:
            return
        self._draining = True
        deadline = time.monotonic() + self.options.drain_timeout
        log(INFO, "Draining %d jobs still in flight", len(self.jobs))
        while self.jobs and time.monotonic() < deadline:
            self._maybe_poll_nodes()
            c0 = time.thread_time()
            got = self._pull()
            self._check_timeouts()
            while self.queue:
                t, event = self.queue.pop()
                if not isinstance(event, TimerDue):
                    self.clock.advance(max(self.now, t))
                    self._handle(event)
            self.cost.loop_cpu += time.thread_time() - c0
            if not got:
                time.sleep(self.options.poll_interval)

    def _record_unfinished(self) -> None:
        """One row per job sent that never finished, reason "in flight at the end"."""
        jobs = sorted(self.jobs.values(), key=lambda j: (j.node.ident, j.job_index))
        for job in jobs:
            self._count(Reason.IN_FLIGHT_AT_END)
            self._record(job, None, accepted=False, reason=Reason.IN_FLIGHT_AT_END)
        self.counters["jobs-unfinished"] = float(len(jobs))

    def _finish(self) -> AsyncResult:
        self.result.arrays = self.versions[self.version].arrays
        applied = [r.staleness for r in self.result.updates if r.applied_in >= 0]
        applied_n = int(self.counters["updates-applied"])
        self.counters["nodes-retired"] = float(self.registry.retired)
        self.counters["nodes-discovered"] = float(self.registry.discovered)
        self.counters["counts-clipped"] = float(self.intake.clipped)
        self.result.counters = {
            **{k: float(v) for k, v in self.counters.items()},
            "versions": float(self.version),
            "final-time": float(self.now),
            "wall-time": float(time.monotonic() - self._wall0),
            **self.cost.as_counters(applied_n),
            "mean-staleness": float(np.mean(applied)) if applied else 0.0,
            "peak-version-store-bytes": float(self.versions.peak_bytes),
        }
        self.result.reasons = dict(self.reasons)
        self.result.stop_reason = self.stop_reason
        log(
            INFO,
            "%s finished (%s): %s",
            type(self.strategy).__name__,
            self.stop_reason,
            {k: v for k, v in self.result.counters.items() if v},
        )
        if self.reasons:
            log(INFO, "Failure reasons: %s", self.reasons)
        return self.result

    # ------------------------------------------------------------------ records
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
            reason=str(reason),
            num_examples=float(update.num_examples) if update else 0.0,
            num_steps=int(update.num_steps) if update else 0,
            duration=float(self.now - job.t_dispatch),
            bytes_down=int(job.bytes_down),
            bytes_up=int(bytes_up),
            msg_id=str(job.msg_id or ""),
            valid=accepted,
        )
        self.result.updates.append(rec)
        return rec

    def _count(self, reason: str) -> None:
        key = str(reason)
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def _evaluate(self) -> None:
        if self.evaluate_fn is None:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        res = self.evaluate_fn(self.version, self.versions[self.version].arrays)
        self.cost.eval_time += time.perf_counter() - t0
        self.cost.eval_cpu += time.thread_time() - c0
        if res is None:
            return
        res = MetricRecord(dict(res))
        res["time"] = float(self.now)
        res["wall-time"] = float(time.monotonic() - self._wall0)
        res["updates-applied"] = int(self.counters["updates-applied"])
        self.result.evaluate_metrics_serverapp[self.version] = res
        log(INFO, "[version %d, t=%.2f] %s", self.version, self.now, dict(res))


def _mean_metrics(updates: list[Update]) -> dict[str, float]:
    """Sample-weighted mean of the scalar client metrics of ``updates`` (identity keys left out)."""
    skip = {"num-examples", *IDENTITY_KEYS}
    tot = sum(u.num_examples for u in updates) or 1.0
    out: dict[str, float] = {}
    for u in updates:
        for k, v in u.metrics.items():
            if k in skip or not isinstance(v, int | float) or isinstance(v, bool):
                continue
            out[k] = out.get(k, 0.0) + float(v) * u.num_examples / tot
    out["num-examples"] = float(sum(u.num_examples for u in updates))
    return out
