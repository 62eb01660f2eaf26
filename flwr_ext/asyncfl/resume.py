"""Checkpoint and resume of an asynchronous run (see docs/asyncfl.md, "Checkpoint and resume").

:func:`snapshot` takes, between two events, everything needed to continue: the model and every
version still referenced, the clock, the nodes, the jobs in flight, the timers, counters,
records, and the strategy's :meth:`~flwr_ext.asyncfl.strategy.AsyncStrategy.state_dict`.
:func:`restore` puts it back into a fresh engine: it re-binds the saved nodes to the connected
ones (by node id, else by ``partition-id`` learned with one identification job per unknown
node) and sends the jobs that were in flight again, unchanged (same node, version, config, job
index), so deterministic clients reproduce the uninterrupted run bit for bit under a virtual
clock.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import TYPE_CHECKING, Any

from flwr.app import MetricRecord
from flwr.common.logger import log

from flwr_ext.asyncfl.checkpoint import load_checkpoint, save_checkpoint
from flwr_ext.asyncfl.intake import Reason
from flwr_ext.asyncfl.types import Job, NodeState

if TYPE_CHECKING:
    from flwr_ext.asyncfl.engine import AsyncEngine

load = load_checkpoint


def _clock_kind(engine: AsyncEngine) -> str:
    return "virtual" if engine.clock.is_virtual else "wall"


def snapshot(engine: AsyncEngine) -> dict[str, Any]:
    """Everything needed to continue the run (taken between two events)."""
    needed = sorted({engine.version} | {j.version for j in engine.jobs.values()})
    needed = [v for v in needed if v in engine.versions]
    return {
        "strategy": type(engine.strategy).__name__,
        "strategy_state": engine.strategy.state_dict(),
        "clock": _clock_kind(engine),
        "now": float(engine.now),
        "version": engine.version,
        "params": engine.params,  # the current model (also in "models"; pickled once)
        "models": {v: engine.versions[v].params for v in needed},
        "nbytes": {v: engine.versions[v].nbytes for v in needed},
        "nodes": sorted(engine.registry.nodes.values(), key=lambda n: n.rank),
        "num_seen_nodes": engine.registry.num_seen,
        "in_flight": sorted(engine.jobs.values(), key=lambda j: (j.node.rank, j.job_index)),
        "timers": engine.queue.timers(),
        "timers_seq": engine.timers_seq,
        "seq": engine.queue.seq,
        "counters": {
            **engine.counters,
            "nodes-retired": float(engine.registry.retired),
            "nodes-discovered": float(engine.registry.discovered),
        },
        "reasons": dict(engine.reasons),
        "ledger": sorted(engine.intake.handled),
        "next_eval": engine.next_eval,
        "updates": engine.result.updates,
        "train_metrics": {v: dict(m) for v, m in engine.result.train_metrics_clientapp.items()},
        "evaluate_metrics": {
            v: dict(m) for v, m in engine.result.evaluate_metrics_serverapp.items()
        },
        "cost": engine.cost,
        "sampler": engine.sampler.getstate(),
    }


def maybe_checkpoint(engine: AsyncEngine) -> None:
    """Write a checkpoint when the version reached the next multiple of ``checkpoint_every``."""
    opts = engine.options
    if not opts.checkpoint_dir or not opts.checkpoint_every:
        return
    if engine.version < engine.last_checkpoint + opts.checkpoint_every:
        return
    t0 = time.perf_counter()
    path = save_checkpoint(opts.checkpoint_dir, snapshot(engine))
    engine.last_checkpoint = engine.version
    engine.counters["checkpoints-written"] = engine.counters.get("checkpoints-written", 0) + 1
    log(
        INFO,
        "Checkpoint of version %d: %s (%.3f s)",
        engine.version,
        path,
        time.perf_counter() - t0,
    )


def restore(engine: AsyncEngine, st: dict[str, Any]) -> None:
    """Restore a :func:`snapshot` into ``engine``; re-bind nodes; re-send the in-flight jobs."""
    name = type(engine.strategy).__name__
    if st["strategy"] != name:
        raise ValueError(f"checkpoint is of {st['strategy']}, not {name}")
    if st["clock"] != _clock_kind(engine):
        raise ValueError(f"checkpoint has a {st['clock']} clock, this run a different one")
    engine.clock.resume_at(st["now"])
    engine.version = int(st["version"])
    for v, params in sorted(st["models"].items()):
        engine.versions.put(v, params, nbytes=int(st["nbytes"][v]), current=v == engine.version)
    engine.set_model_spec(engine.params)
    engine.result.arrays = engine.versions[engine.version].arrays
    engine.result.updates = st["updates"]
    engine.result.train_metrics_clientapp.update(
        {v: MetricRecord(m) for v, m in st["train_metrics"].items()}
    )
    engine.result.evaluate_metrics_serverapp.update(
        {v: MetricRecord(m) for v, m in st["evaluate_metrics"].items()}
    )
    engine.counters.update(st["counters"])
    engine.counters["resumes"] = engine.counters.get("resumes", 0) + 1
    engine.registry.retired = int(st["counters"].get("nodes-retired", 0))
    engine.registry.discovered = int(st["counters"].get("nodes-discovered", 0))
    engine.registry.num_seen = int(st["num_seen_nodes"])
    engine.reasons = dict(st["reasons"])
    engine.intake.handled = set(st["ledger"])
    engine.next_eval = float(st["next_eval"])
    engine.timers_seq = int(st["timers_seq"])
    engine.queue.seq = int(st["seq"])
    engine.cost = st["cost"]
    engine.sampler.setstate(st["sampler"])
    engine.last_checkpoint = engine.version
    engine.wait_for_nodes()
    _rebind_nodes(engine, st["nodes"])
    for timer in st["timers"]:
        engine.queue.push_timer(timer)
    engine.strategy.load_state_dict(engine, st["strategy_state"])
    _redispatch(engine, st["in_flight"])
    engine.poll_nodes()  # saved nodes that did not come back: retired
    engine.versions.collect()
    log(
        INFO,
        "Resumed %s at version %d, t=%.3f, %d jobs re-sent",
        name,
        engine.version,
        engine.now,
        len(engine.jobs),
    )


def _rebind_nodes(engine: AsyncEngine, saved: list[NodeState]) -> None:
    """Map the saved nodes onto the connected ones (node ids may all have changed).

    Same node id: the same node. Otherwise a saved node that had reported its ``partition-id``
    is the connected node that reports the same one (one identification job per unknown node);
    saved nodes that never reported one take the remaining connected nodes in rank order.
    """
    current = sorted(int(n) for n in engine.grid.get_node_ids())
    present = set(current)
    saved_ids = {n.node_id for n in saved}
    new_ids = [nid for nid in current if nid not in saved_ids]
    lost = [n for n in saved if n.node_id not in present and not n.retired]
    keys = engine.probe(new_ids, counter="resume-identify-jobs") if new_ids and lost else {}
    by_key = {n.key: n for n in lost if n.key is not None}
    bound: dict[int, NodeState] = {}
    for nid in new_ids:
        node = by_key.pop(keys[nid], None) if nid in keys else None
        if node is not None:
            bound[nid] = node
    rest_saved = [n for n in lost if n.key is None]
    rest_new = [nid for nid in new_ids if nid not in bound]
    for nid, node in zip(rest_new, rest_saved, strict=False):
        bound[nid] = node
    reg = engine.registry
    seen = reg.num_seen
    reg.replace_all(saved)  # kept under their old ids unless re-bound below
    for nid, node in bound.items():
        reg.rebind(node, nid)
    reg.num_seen = seen
    for nid in new_ids:
        if nid not in bound:  # a node the saved run never saw
            reg.add(nid, key=keys.get(nid))


def _redispatch(engine: AsyncEngine, jobs: list[Job]) -> None:
    """Send the saved in-flight jobs again: same node, version, config, job index.

    A job whose model version the engine did not keep (``replies_are_deltas``: jobs hold no
    version, so the checkpoint has none) cannot be re-sent unchanged: it is given up
    (:attr:`Reason.VERSION_NOT_KEPT`), its node is free, and the strategy sends it a new job on
    the current model.
    """
    present = {int(n) for n in engine.grid.get_node_ids()}
    nodes = engine.registry.nodes
    live = [
        j
        for j in jobs
        if j.node.node_id in nodes and not j.node.retired and j.node.node_id in present
    ]
    for job in [j for j in live if j.version not in engine.versions]:
        live.remove(job)
        job.msg_id = None
        engine.abandon(job, Reason.VERSION_NOT_KEPT)
    msgs = []
    for job in live:
        cfg = {**engine.train_config, **job.extra, "server-round": job.version}
        v = engine.versions[job.version]
        if engine.downlink is None:
            msgs.append(engine.train_message(job.node.node_id, v.arrays, cfg))
        else:  # shadows are not checkpointed: every node is new again (dense, counted)
            msg, job.shadow, job.bytes_down = engine.downlink_message(
                job.node.node_id, v.params, cfg
            )
            msgs.append(msg)
    ids = set(engine.grid.push_messages(msgs)) if msgs else set()
    unsent = []
    for job, msg in zip(live, msgs, strict=True):
        mid = msg.metadata.message_id
        job.wall_dispatch = time.monotonic()
        job.released = False
        if mid and mid in ids:
            job.msg_id = mid
            engine.start_job(job)
        else:
            job.msg_id = None
            unsent.append(job)
    for job in unsent:
        engine.abandon(job, Reason.PUSH_FAILED_ON_RESUME)
    for job in jobs:
        if job not in live and job.t_finish is None:  # its node is gone
            job.msg_id = None
            if job.node.node_id not in present:
                engine.registry.retire(job.node, Reason.NODE_VANISHED)
            engine.abandon(job, Reason.NODE_VANISHED)
