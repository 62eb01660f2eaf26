"""Exactly-once checks over the files an async run writes (engine ledger, per-update CSV).

An :class:`~flwr_ext.asyncfl.AsyncResult` run with ``output-dir`` leaves, for strategy ``name``:

* ``<name>-updates.csv``: one row per job sent (``msg_id``, ``node_id``, ``job``,
  ``accepted``, ``reason``, ``applied_in`` = the model version it went into, ``-1`` if none):
  its reply, or why there was none (``job timeout``, ``node vanished``, ``in flight at the
  end``, ...);
* ``<name>-ledger.csv``: one row per accepted update, by the message id of the train
  instruction it answered (written by the engine);
* ``<name>-counters.json``: engine counters and stop reason;
* ``<name>.json``: per-version commit metrics (``num-updates``, ``nodes``).

:func:`check_run` cross-checks them, and optionally against a client-side witness: lines
``run_id,msg_id,...`` that each ClientApp appends just before returning a reply (the light app
in ``bench/apps/light-async`` does, with the node config ``reply-log``). "Lost" means an
accepted update that was neither applied, nor discarded with a reason, nor still waiting in a
strategy's buffer when the run ended. An update still waiting at the end counts as lost when it
arrived before the last model version was made (FedAsync and FedBuff use every waiting update
in their next commit; FedCompass discards held ones with a reason when the run ends), or when
more are waiting than ``max_pending`` (FedBuff: ``buffer-size - 1``). "Unaccounted" means a
job the engine counted as sent (``jobs-dispatched``) without a row, or a row too many.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flwr_ext.asyncfl.records import NO_REPLY_REASONS


@dataclass
class LedgerReport:
    """Counts from one run; :attr:`ok` is True when nothing was lost or applied twice."""

    rows: int = 0
    accepted: int = 0
    applied: int = 0
    discarded: int = 0
    pending_at_end: int = 0
    lost: int = 0
    rejected: int = 0
    versions: int = 0
    duplicate_jobs: int = 0
    duplicate_msg_ids: int = 0
    ledger_mismatch: int = 0
    version_mismatch: int = 0
    counter_mismatch: list[str] = field(default_factory=list)
    duplicate_replies: int = 0
    unknown_replies: int = 0
    jobs_sent: int = -1
    unaccounted_jobs: int = 0
    no_reply: dict[str, int] = field(default_factory=dict)
    client_replies: int = -1
    phantom: int = -1
    unrecorded_client_replies: int = -1
    client_cpu_s: list[float] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No accepted update lost, none recorded or applied twice, all files agree."""
        bad = (
            self.lost,
            self.duplicate_jobs,
            self.duplicate_msg_ids,
            self.ledger_mismatch,
            self.version_mismatch,
            self.duplicate_replies,
            self.unknown_replies,
            self.unaccounted_jobs,
            max(self.phantom, 0),
        )
        return not any(bad) and not self.counter_mismatch

    def as_dict(self) -> dict:
        """Plain dict (without the per-reply CPU list), plus ``ok``."""
        out = asdict(self)
        out.pop("client_cpu_s")
        out["ok"] = self.ok
        return out


def read_client_log(log_dir: str | Path, run_id: int | None = None) -> list[list[str]]:
    """Rows ``[run_id, msg_id, partition_id, unix_time, clientapp_cpu_s, pid]`` of ``log_dir``."""
    rows = []
    for path in sorted(Path(log_dir).glob("client-*.csv")):
        for line in path.read_text().splitlines():
            parts = line.split(",")
            if len(parts) >= 2 and (run_id is None or parts[0] == str(run_id)):
                rows.append(parts)
    return rows


def check_run(
    out_dir: str | Path,
    name: str,
    client_log: str | Path | None = None,
    run_id: int | None = None,
    max_pending: int = 0,
) -> LedgerReport:
    """Cross-check the files of run ``name`` in ``out_dir`` (see the module docstring).

    Parameters
    ----------
    out_dir : str or Path
        The run's ``output-dir``.
    name : str
        The strategy name the files are named after.
    client_log : str or Path, optional
        Directory of the ClientApps' reply logs; adds the witness checks (``phantom``: a
        ledger entry no ClientApp sent; ``unrecorded_client_replies``: replies sent by a
        ClientApp that the server never recorded, e.g. in flight when the run ended).
    run_id : int, optional
        Only client-log lines of this run.
    max_pending : int
        How many accepted updates may legitimately wait unapplied in a buffer at the end.
    """
    out = Path(out_dir)
    with (out / f"{name}-updates.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    with (out / f"{name}-ledger.csv").open() as fh:
        ledger = list(csv.DictReader(fh))
    info = json.loads((out / f"{name}-counters.json").read_text())
    counters = info["counters"]
    train = json.loads((out / f"{name}.json").read_text()).get("train_metrics_clientapp", {})

    rep = LedgerReport(rows=len(rows), versions=int(counters.get("versions", 0)))
    jobs = [(r["node_id"], r["job"]) for r in rows]
    rep.duplicate_jobs = len(jobs) - len(set(jobs))
    accepted = [r for r in rows if r["accepted"] == "True"]
    applied = [r for r in accepted if int(r["applied_in"]) >= 1]
    valid = [r for r in rows if r.get("valid", r["accepted"]) == "True"]
    rep.accepted = len(valid)
    rep.applied = len(applied)
    rep.rejected = len(rows) - len(valid)
    waiting = [r for r in valid if r["accepted"] == "True" and int(r["applied_in"]) < 1]
    rep.discarded = len([r for r in valid if r["accepted"] != "True"])
    late = [r for r in waiting if int(r["server_version"]) >= rep.versions]
    rep.pending_at_end = len(late)
    rep.lost = len(waiting) - len(late) + max(0, len(late) - max_pending)

    ids = [r["msg_id"] for r in ledger]
    rep.duplicate_msg_ids = len(ids) - len(set(ids))
    rep.ledger_mismatch = len(set(ids) ^ {r["msg_id"] for r in valid})
    by_id = {r["msg_id"]: r for r in rows}
    rep.ledger_mismatch += sum(
        1
        for r in ledger
        if r["msg_id"] in by_id and r["applied_in"] != by_id[r["msg_id"]]["applied_in"]
    )

    per_version = Counter(int(r["applied_in"]) for r in applied)
    for v in range(1, rep.versions + 1):
        metrics = train.get(str(v), {})
        nodes = sorted(int(r["node"]) for r in applied if int(r["applied_in"]) == v)
        want = sorted(metrics.get("nodes", []))
        if per_version[v] != metrics.get("num-updates") or nodes != want:
            rep.version_mismatch += 1
    rep.version_mismatch += sum(1 for v in per_version if not 1 <= v <= rep.versions)

    for key, mine in (
        ("updates-applied", rep.applied),
        ("updates-accepted", rep.accepted),
        ("updates-discarded", rep.discarded),
    ):
        if int(counters.get(key, -1)) != mine:
            rep.counter_mismatch.append(f"{key}: counters {counters.get(key)} vs rows {mine}")
    if "jobs-unfinished" in counters:  # an engine that writes a row for every job sent
        rep.jobs_sent = int(counters.get("jobs-dispatched", 0))
        rep.unaccounted_jobs = abs(rep.jobs_sent - len(rows))
    rep.no_reply = dict(Counter(r["reason"] for r in rows if r["reason"] in NO_REPLY_REASONS))
    rep.duplicate_replies = int(counters.get("duplicate-replies", 0))
    rep.unknown_replies = int(counters.get("unknown-replies", 0))

    if client_log is not None:
        sent = read_client_log(client_log, run_id)
        sent_ids = {r[1] for r in sent}
        rep.client_replies = len(sent)
        rep.phantom = len(set(ids) - sent_ids)
        rep.unrecorded_client_replies = len(sent_ids - set(by_id))
        rep.client_cpu_s = [float(r[4]) for r in sent if len(r) >= 5]
    return rep
