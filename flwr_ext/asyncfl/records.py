"""Per-update records of an asynchronous run and the Result that carries them."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flwr.serverapp.strategy import Result

#: ``reason`` of the row written for a job still in flight when the run ended.
IN_FLIGHT_AT_END = "in flight at the end"
#: Reasons of the rows of jobs that got no reply at all (the engine gave up on them).
NO_REPLY_REASONS = ("job timeout", "node vanished", "push failed on resume", IN_FLIGHT_AT_END)


@dataclass
class UpdateRecord:
    """One job sent: when it ended, from whom, how stale, and what happened to it.

    Every job the engine sent has one record: its reply (accepted, or rejected with a
    reason), an error reply, a job given up on (``job timeout``, ``node vanished``), or
    :data:`IN_FLIGHT_AT_END`.

    ``time`` is the clock time (virtual or wall) at which the engine handled the reply;
    ``applied_in`` the server model version it contributed to (``-1``: never applied);
    ``msg_id`` the id of the train instruction the reply answered (the update's id);
    ``valid`` whether the reply passed validation (``accepted`` turns False when the strategy
    later discards it, ``valid`` stays True).
    """

    time: float
    wall_time: float
    node: int
    node_id: int
    job: int
    version_sent: int
    server_version: int
    staleness: int
    accepted: bool
    reason: str
    num_examples: float
    num_steps: int
    duration: float
    bytes_down: int
    bytes_up: int
    applied_in: int = -1
    msg_id: str = ""
    valid: bool = False


@dataclass
class AsyncResult(Result):
    """A :class:`flwr.serverapp.strategy.Result` plus the per-update log of an async run.

    ``train_metrics_clientapp[v]`` holds, for each server model version ``v``: ``time``,
    ``wall-time``, ``num-updates``, ``mean-staleness``, ``max-staleness``, ``staleness`` and
    ``nodes`` (lists over the updates applied) and the mean client metrics.
    ``evaluate_metrics_serverapp[v]`` adds ``time``, ``wall-time`` and ``updates-applied`` to
    what ``evaluate_fn`` returned.
    """

    updates: list[UpdateRecord] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    stop_reason: str = ""

    @property
    def finished(self) -> list[UpdateRecord]:
        """The records of jobs that ended during the run (all but :data:`IN_FLIGHT_AT_END`)."""
        return [r for r in self.updates if r.reason != IN_FLIGHT_AT_END]

    def write_csv(self, path: str | Path) -> Path:
        """Write the per-update records as CSV; return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [f.name for f in fields(UpdateRecord)]
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            for rec in self.updates:
                writer.writerow(asdict(rec))
        return path

    def write_ledger(self, path: str | Path) -> Path:
        """Write the ledger of accepted updates as CSV; return the path.

        One row per accepted update: ``msg_id`` (the train instruction it answered; unique),
        ``node_id`` (SuperNode id), ``node`` (``partition-id`` or rank), ``job`` (index on that
        node), ``version_sent`` (model version it trained on), ``received_at`` (server version
        when it was handled), ``applied_in`` (the version it went into, ``-1``: none) and
        ``status``: ``applied``, or ``discarded`` with the strategy's reason. A deployment test
        proves exactly-once by checking that ``msg_id`` is unique, every ``applied`` row has
        one ``applied_in`` version, and the per-version counts match the commit metrics.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = ["msg_id", "node_id", "node", "job", "version_sent", "received_at"]
        names += ["applied_in", "status", "reason"]
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            for r in self.updates:
                applied = r.applied_in >= 0
                if not r.valid:
                    continue
                writer.writerow(
                    [r.msg_id, r.node_id, r.node, r.job, r.version_sent, r.server_version]
                    + [r.applied_in, "applied" if applied else "discarded", r.reason]
                )
        return path

    def __repr__(self) -> str:  # keep Flower's summary, add the counters
        base = super().__repr__()
        nonzero = {k: v for k, v in self.counters.items() if v}
        return f"{base}\nCounters: {nonzero}\nReasons: {self.reasons}"


#: Counters every run reports (others, such as ``resumes``, appear when they happen).
COUNTERS = (
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


@dataclass
class CostMeter:
    """Server cost of a run (see docs/asyncfl.md, "Server cost").

    ``overhead`` is the loop's wall time minus evaluation; ``loop_cpu`` its thread CPU time
    minus evaluation; ``handle_cpu`` the CPU time of handling events (checks, decoding, the
    strategy's hooks, ``commit``); ``eval_time`` / ``eval_cpu`` the evaluation's.
    """

    overhead: float = 0.0
    loop_cpu: float = 0.0
    handle_cpu: float = 0.0
    eval_time: float = 0.0
    eval_cpu: float = 0.0

    def as_counters(self, applied: int) -> dict[str, float]:
        """The cost entries of ``result.counters``."""
        return {
            "server-overhead-s": float(self.overhead),
            "server-cpu-s": float(self.loop_cpu),
            "engine-cpu-s": float(self.handle_cpu),
            "engine-cpu-ms-per-update": (
                1000.0 * self.handle_cpu / applied if applied else float("nan")
            ),
            "evaluate-s": float(self.eval_time),
            "evaluate-cpu-s": float(self.eval_cpu),
        }
