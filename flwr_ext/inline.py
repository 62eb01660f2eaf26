"""An in-process backend for virtual-clock runs: the packaged apps, no Ray, no SuperLink.

Under a :class:`~flwr_ext.asyncfl.clock.VirtualClock` the wall-clock path of a message does not
change a run's result: the engine orders events by virtual time, whatever order replies arrive
in. :class:`InlineGrid` is a :class:`flwr.serverapp.Grid` that runs the ClientApp object itself,
in the ServerApp's process, when the ServerApp pulls a reply (or, with ``workers=n``, in a pool
of ``n`` warm worker processes, different nodes in parallel); :func:`run_inline` runs a
ServerApp on it. What a ClientApp sees is what Flower's Simulation Engine (``run_simulation``,
Flower 1.42) gives it:

- one :class:`~flwr.app.Context` per node, created once per run, with
  ``node_config = {"partition-id": i, "num-partitions": n}``, the run config, and a ``state``
  RecordDict that persists across messages. As in the Simulation Engine (where the Context
  travels to a Ray actor and back by value), each call gets a copy and the copy becomes the node's
  Context only if the call succeeds; a call that changes ``run_config`` fails the same way;
- the message as the ClientApp receives it (a copy of the content, never the server's object),
  and the ClientApp object is called, so its mods run exactly as Flower runs them;
- node ids drawn at random per run (``node_id_seed`` fixes the draw), partition ids
  ``0..n-1`` in node creation order;
- a ClientApp that raises gives an error reply with Flower's code and reason text
  (``CLIENT_APP_RAISED_EXCEPTION``, ``"<class '...ClientAppException'>:<'...'>"``);
- the messages of one node run one at a time in the order they were pushed: running a message
  first runs every earlier message still pending for that node (their replies wait to be
  pulled). The Simulation Engine, too, runs every pushed message (also jobs a finished strategy
  left in flight), but may run two of one node's messages at once from the same Context, the
  last to finish writing it; set ``drain-timeout`` there (``docs/simulation.md``).

Differences: replies are computed when pulled (on a virtual clock the engine cannot tell); a
message's TTL is not enforced (a virtual-clock run measures time on the virtual clock); the
process-global random states (``random``, ``numpy.random``, ``torch``) are saved before and
restored after each ClientApp call, so a client's draws never shift the ServerApp's (in the
Simulation Engine they live in other processes). A real clock is refused: wall-clock results
would measure this backend's serial execution, not the federation.
"""

from __future__ import annotations

import copy
import csv
import json
import random
import sys
import time
import traceback
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from logging import ERROR
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from uuid import uuid4

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import ClientAppException, LoadClientAppError
from flwr.common.constant import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    SUPERLINK_NODE_ID,
    ErrorCode,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

#: Message shown when a run on this backend asks for a real clock.
REAL_CLOCK_REFUSED = (
    "backend='inline' runs every ClientApp one after the other in the ServerApp's process, so "
    "wall-clock times (clock='real', RealClock) would measure this backend, not the "
    "federation. Use clock='virtual', or backend='simulation' (Flower's Simulation Engine) for "
    "wall-clock runs."
)


class RealClockRefused(ValueError):
    """A run on the inline backend asked for a real clock."""

    def __init__(self) -> None:
        super().__init__(REAL_CLOCK_REFUSED)


def check_virtual_clock(run_config: dict[str, Any]) -> None:
    """Raise :class:`RealClockRefused` if ``run_config`` selects ``clock = "real"``."""
    if str(run_config.get("clock", "virtual")).strip().lower() == "real":
        raise RealClockRefused()


@dataclass
class InlineStats:
    """What an inline run did: messages run, and the wall time spent inside the ClientApp."""

    messages: int = 0
    errors: int = 0
    client_s: float = 0.0
    per_node: dict[int, int] = field(default_factory=dict)


class _RandomStates:
    """Process-global RNG states (``random``, ``numpy.random``, ``torch`` if imported)."""

    def __init__(self) -> None:
        self.py = random.getstate()
        self.np = np.random.get_state()
        torch = sys.modules.get("torch")
        self.torch = torch.random.get_rng_state() if torch is not None else None

    def restore(self) -> None:
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch = sys.modules.get("torch")
        if torch is not None and self.torch is not None:
            torch.random.set_rng_state(self.torch)


class InlineGrid(Grid):
    """A Grid whose nodes run ``client_app`` in this process when their replies are pulled.

    Parameters
    ----------
    client_app : ClientApp
        The app's ClientApp object (its mods run on every call).
    num_supernodes : int
        Number of nodes; partition ids ``0..num_supernodes-1``.
    run_config : dict
        The run config every node's Context carries (see :func:`flwr_ext.sim.fused_run_config`).
    node_id_seed : int, optional
        Seed for the node-id draw (default: random ids every run, as the Simulation Engine).
    run_id : int, optional
        The run id (default: drawn at random).
    workers : int
        ``0`` (default): each ClientApp call runs in this process when its reply is pulled.
        ``n > 0``: a pool of ``n`` warm worker processes (forked from this one, so the ClientApp
        object need not be picklable) runs the messages as they are pushed, different nodes in
        parallel, each node's in push order; Message and Context travel by pickle (by value, as to
        a Ray actor). Call :meth:`close` at the end (:func:`run_inline` does).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_supernodes: int,
        run_config: dict[str, Any],
        *,
        node_id_seed: int | None = None,
        run_id: int | None = None,
        workers: int = 0,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        rng = random.Random(node_id_seed) if node_id_seed is not None else random.SystemRandom()
        self.client_app = client_app
        self._run_config = dict(run_config)
        self._run = Run.create_empty(run_id=run_id if run_id is not None else rng.getrandbits(63))
        ids: list[int] = []
        while len(ids) < num_supernodes:
            nid = rng.getrandbits(63)
            if nid not in ids and nid != SUPERLINK_NODE_ID:
                ids.append(nid)
        self.node_ids = ids
        self.partition = {nid: i for i, nid in enumerate(ids)}
        self._contexts = {
            nid: Context(
                run_id=self._run.run_id,
                node_id=nid,
                node_config={PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_supernodes},
                state=RecordDict(),
                run_config=dict(self._run_config),
            )
            for i, nid in enumerate(ids)
        }
        self._pending: OrderedDict[str, Message] = OrderedDict()  # pushed, not yet run
        self._replies: dict[str, Message] = {}  # run, not yet pulled
        self.stats = InlineStats()
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[str, tuple[int, Future]] = {}
        self._busy: set[int] = set()
        if workers > 0:
            global _WORKER_APP  # noqa: PLW0603  (inherited by the forked workers)
            _WORKER_APP = client_app
            self._pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"))
        # A Message needs the run's identity (Flower sets it in a ServerApp process).
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # ------------------------------------------------------------------ Grid API
    def set_run(self, run: Run) -> None:
        """Use ``run`` (its id) for the messages of this Grid."""
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        """The run this Grid operates in."""
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A new instruction message (deprecated in Flower; use ``Message(...)``)."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of the nodes (all connected for the whole run)."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages for their nodes; return the ids of those accepted.

        As Flower's InMemoryGrid: each message gets a new id; one that replies to a message,
        has no positive TTL, or was already delivered is invalid (``ValueError``); one for an
        unknown node is not accepted (its id is not returned).
        """
        _refuse_real_clock_caller()
        ids: list[str] = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            meta = msg.metadata
            if meta.reply_to_message_id != "" or meta.ttl <= 0 or meta.delivered_at != "":
                raise ValueError(f"Invalid message: {msg}")
            if meta.dst_node_id not in self._contexts:
                continue
            self._pending[meta.message_id] = msg
            ids.append(meta.message_id)
            if self._pool is not None:
                self._pump(meta.dst_node_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp on the requested messages still pending; return their replies."""
        wanted = list(dict.fromkeys(message_ids))
        if self._pool is not None:
            self._collect(set(wanted))
        else:
            for mid in wanted:
                if mid in self._pending:
                    self._run_node_until(mid)
        return [self._replies.pop(mid) for mid in wanted if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push ``messages`` and return their replies (all of them: each runs to completion)."""
        del timeout  # every pushed message is answered before this returns
        want = list(self.push_messages(messages))
        replies: list[Message] = []
        while len(replies) < len(want):
            replies += self.pull_messages(
                [m for m in want if m not in {r.metadata.reply_to_message_id for r in replies}]
            )
        return replies

    # ------------------------------------------------------------------ execution
    def _run_node_until(self, message_id: str) -> None:
        """Run the pending messages of ``message_id``'s node, oldest first, up to it."""
        node = self._pending[message_id].metadata.dst_node_id
        for mid in [m for m, msg in self._pending.items() if msg.metadata.dst_node_id == node]:
            msg = self._pending.pop(mid)
            self._replies[mid] = self._execute(msg)
            if mid == message_id:
                return

    def _execute(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        rng = _RandomStates()
        try:
            reply, context, seconds = _call_client(
                self.client_app,
                copy.deepcopy(message),
                copy.deepcopy(self._contexts[node_id]),
                self._run_config,
            )
        finally:
            rng.restore()
        return self._commit(node_id, copy.deepcopy(reply), context, seconds)

    def _commit(
        self, node_id: int, reply: Message, context: Context | None, seconds: float
    ) -> Message:
        if context is not None:
            self._contexts[node_id] = context
        else:
            self.stats.errors += 1
        self.stats.client_s += seconds
        self.stats.messages += 1
        self.stats.per_node[node_id] = self.stats.per_node.get(node_id, 0) + 1
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        return reply

    # ------------------------------------------------------------------ worker pool
    def _pump(self, node_id: int) -> None:
        """Start the oldest queued message of ``node_id`` in the pool if the node is idle."""
        if node_id in self._busy:
            return
        for mid, msg in self._pending.items():
            if msg.metadata.dst_node_id == node_id:
                del self._pending[mid]
                future = self._pool.submit(
                    _worker_call, msg, self._contexts[node_id], self._run_config
                )
                self._running[mid] = (node_id, future)
                self._busy.add(node_id)
                return

    def _collect(self, wait_for: set[str]) -> None:
        """Store finished replies; block until one of ``wait_for`` has a reply (if any is due)."""
        while True:
            for mid, (node_id, future) in list(self._running.items()):
                if future.done():
                    del self._running[mid]
                    self._busy.discard(node_id)
                    reply, context, seconds = future.result()
                    self._replies[mid] = self._commit(node_id, reply, context, seconds)
                    self._pump(node_id)
            due = wait_for & (set(self._running) | set(self._pending))
            if not wait_for or wait_for & set(self._replies) or not due:
                return
            wait([f for _, f in self._running.values()], return_when=FIRST_COMPLETED)

    def close(self) -> None:
        """Stop the worker pool (jobs not started are dropped; running ones finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


#: The ClientApp of a worker process (set before the pool forks).
_WORKER_APP: ClientApp | None = None


def _worker_call(
    message: Message, context: Context, run_config: dict[str, Any]
) -> tuple[Message, Context | None, float]:
    """Run in a worker process: the ClientApp on ``message`` (a copy, as is ``context``)."""
    assert _WORKER_APP is not None
    return _call_client(_WORKER_APP, message, context, run_config)


def _call_client(
    client_app: ClientApp, message: Message, context: Context, run_config: dict[str, Any]
) -> tuple[Message, Context | None, float]:
    """``(reply, updated context or None if the call failed, seconds in the call)``.

    As Flower's Simulation Engine worker: an exception becomes an error reply with Flower's
    code and reason text; a call that changed ``run_config`` fails.
    """
    t0 = time.perf_counter()
    try:
        try:
            reply = client_app(message=message, context=context)
        except LoadClientAppError:
            raise
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
        if context.run_config != run_config:
            raise ValueError(
                "The `run_config` field of the `Context` object cannot be "
                f"modified (run_id: {context.run_id})."
            )
        return reply, context, time.perf_counter() - t0
    except Exception as ex:  # noqa: BLE001  (as Flower's Simulation Engine: an error reply)
        log(ERROR, ex)
        log(ERROR, traceback.format_exc())
        if isinstance(ex, ClientAppException):
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        elif isinstance(ex, LoadClientAppError):
            code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
        else:
            code = ErrorCode.UNKNOWN
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        reply = Message(Error(code=code, reason=reason), reply_to=message)
        return reply, None, time.perf_counter() - t0


def _refuse_real_clock_caller() -> None:
    """Raise :class:`RealClockRefused` if the caller two frames up is an engine on a real clock.

    The flwr-ext async engine calls ``push_messages`` from its own methods; its ``clock``
    attribute says which clock it runs. (A ServerApp that builds a ``RealClock`` itself, without
    the ``clock`` run-config key, is caught here.)
    """
    try:
        frame = sys._getframe(2)  # noqa: SLF001  push_messages <- engine method
    except ValueError:  # called from the top level of a script
        return
    owner = frame.f_locals.get("self")
    clock = getattr(owner, "clock", None)
    if clock is not None and getattr(clock, "is_virtual", True) is False:
        raise RealClockRefused()


def run_inline(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_supernodes: int,
    run_config: dict[str, Any],
    node_id_seed: int | None = None,
    workers: int = 0,
) -> InlineGrid:
    """Run ``server_app`` against ``num_supernodes`` in-process nodes running ``client_app``.

    The ServerApp runs in the calling thread with a Context like the Simulation Engine's
    (``node_id = 0``, empty node config, empty state, ``run_config``); whatever it raises
    propagates. Returns the grid (``grid.stats``: messages run, time inside the ClientApp).

    Raises
    ------
    RealClockRefused
        If ``run_config["clock"] == "real"`` (or the engine turns out to run a real clock).
    """
    check_virtual_clock(run_config)
    grid = InlineGrid(
        client_app, num_supernodes, run_config, node_id_seed=node_id_seed, workers=workers
    )
    context = Context(
        run_id=grid.run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(run_config),
    )
    try:
        server_app(grid=grid, context=context)
    finally:
        grid.close()
    return grid


#: Columns of the per-update CSV (``AsyncResult.write_csv``) that differ between two runs of the
#: same seeded configuration by nature: ``wall_time`` (wall clock), ``node_id`` (drawn at random
#: per run, by the Simulation Engine and by this backend) and ``msg_id`` (a random UUID per
#: message). Every other column (virtual time, node key, job, versions, staleness, acceptance and
#: reason, examples, steps, duration, bytes) is equal between the inline backend and the
#: Simulation Engine.
RANDOM_COLUMNS = ("wall_time", "node_id", "msg_id")
#: The wall-clock entry of the result JSON's metric records (``<name>.json``).
WALL_METRICS = ("wall-time",)


#: ``reason`` of the rows of replies handled after the run ended (``drain-timeout``). The engine
#: handles them in the order they are pulled, which in the Simulation Engine is the order Ray
#: returns them in, and stamps each with ``max(clock now, its finish time)``; so these rows are
#: compared as a set, sorted by ``(node, job)``, without the order-dependent ``time``,
#: ``duration`` and cumulative byte counts.
AFTER_END = "reply after the run ended"
_ORDER_DEPENDENT = ("time", "duration", "uplink_cumulative", "downlink_cumulative")


def _read_rows(path: Path, drop: tuple[str, ...] = ()) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        rows = [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(fh)]
    during = [r for r in rows if r.get("reason") != AFTER_END]
    after = [
        {k: v for k, v in r.items() if k not in _ORDER_DEPENDENT}
        for r in rows
        if r.get("reason") == AFTER_END
    ]
    return during + sorted(after, key=lambda r: (int(r["node"]), int(r["job"])))


def comparable_records(
    out_dir: str | Path, name: str, wall_metrics: tuple[str, ...] = ()
) -> dict[str, Any]:
    """What two runs of one seeded configuration must share, from the files the apps write.

    ``updates``: the rows of ``<name>-updates.csv`` without :data:`RANDOM_COLUMNS`;
    ``bytes``: the rows of ``<name>-bytes.csv`` (if written); ``metrics``: ``<name>.json``
    without :data:`WALL_METRICS` and ``wall_metrics`` (wall-clock metrics of the app's own, e.g. a
    client's measured training time). Rows of replies handled after the end (:data:`AFTER_END`) come
    last, sorted by ``(node, job)``.
    """
    out = Path(out_dir)
    rec: dict[str, Any] = {"updates": _read_rows(out / f"{name}-updates.csv", RANDOM_COLUMNS)}
    if (out / f"{name}-bytes.csv").is_file():
        rec["bytes"] = _read_rows(out / f"{name}-bytes.csv")
    metrics = json.loads((out / f"{name}.json").read_text())
    rec["metrics"] = {
        section: {
            v: {k: x for k, x in m.items() if k not in WALL_METRICS + wall_metrics}
            for v, m in per.items()
        }
        for section, per in metrics.items()
    }
    return rec


def compare_runs(
    dir_a: str | Path, dir_b: str | Path, name: str, wall_metrics: tuple[str, ...] = ()
) -> list[str]:
    """Differences between two runs' records of strategy ``name`` (empty: identical).

    See :func:`comparable_records` for what is compared.
    """
    a = comparable_records(dir_a, name, wall_metrics)
    b = comparable_records(dir_b, name, wall_metrics)
    diffs = []
    for key in sorted(set(a) | set(b)):
        ra, rb = a.get(key), b.get(key)
        if ra == rb:
            continue
        if isinstance(ra, list) and isinstance(rb, list):
            if len(ra) != len(rb):
                diffs.append(f"{name} {key}: {len(ra)} rows vs {len(rb)}")
                continue
            i = next(i for i, (x, y) in enumerate(zip(ra, rb, strict=True)) if x != y)
            diffs.append(f"{name} {key} row {i}: {ra[i]} vs {rb[i]}")
        else:
            diffs.append(f"{name} {key} differ")
    return diffs
