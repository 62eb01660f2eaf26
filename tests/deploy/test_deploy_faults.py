"""apps/async-vision on real Flower processes with TLS + SuperNode auth, a crash and a join.

A SuperLink (TLS, ``--enable-supernode-auth``, its own FLWR_HOME and SQLite database in
``tmp_path``) and three registered SuperNodes, each with an artificial per-job delay set
through ``--node-config delay-s=...``, run the app twice at once, with FedBuff and with
FedCompass, on the real clock: two runs submitted with ``flwr run <app> <connection>`` that the
SuperNodes serve side by side. Once SuperNode 2 has delivered a reply and started the ClientApp
of its next job, it and every process it started are SIGKILLed, and a new, freshly registered
SuperNode (partition 3) is started.

Checked for each run, from the engine's files (not from logs): the run finishes
(``num-server-rounds``); the dead node's last job is retired after a timeout, whichever fires
first: the engine's job timeout (its row in the per-update ledger says ``job timeout``, or the
SuperLink's ``message unavailable (expired TTL)`` for the same expiry; no earlier than the
timeout) or Flower's heartbeat patience (``node unavailable`` / ``node vanished``; at least
30 s after it was sent); its earlier jobs were delivered, and the node is retired; the new
node gets work and delivers a valid update;
:func:`flwr_ext.deploy.ledger.check_run` finds every job sent with exactly one row and every
accepted update applied exactly once or discarded with a reason. Every process is stopped, also
when an assertion fails.

Timing. Flower marks a killed SuperNode offline after two missed 30 s heartbeats (not
configurable from the command line); the engine's job timeout (``timeout``, also the message
TTL) is the other way a dead node's job ends. It must be generous: a SuperNode's first job
(fetching the app, starting a ClientApp that imports torch) took over 40 s at load 10 here, and
a TTL expiry with ``max-failures=1`` retires a live node. The run may reach its last version
before the dead node's job expires: ``drain-timeout`` makes the ServerApp wait for the jobs
still in flight, so that job always ends the way it would mid-run. Both strategies run at once
so the test waits for one timeout, not two. Nothing is awaited with a fixed sleep or on log
text: the kill waits for the victim's next ClientApp process (the process table), the checks
for the runs' status (``flwr list``) and the engine's files.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from flwr_ext.deploy import LocalCluster, SuperNodeHandle
from flwr_ext.deploy.ledger import check_run

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "apps" / "async-vision"
ROUNDS = 6
TIMEOUT = 180.0  # per-job timeout and message TTL (4x the slowest first job seen under load)
DELAYS = (0.2, 0.5, 2.0)  # partitions 0, 1 and the victim (2); the newcomer (3) gets 0.2
STRATEGIES = {
    "fedbuff": {"buffer-size": 2},
    "fedcompass": {"compass-q-min": 5, "compass-q-max": 20},
}
# the engine's job timeout, or the SuperLink's answer when the message's TTL (the same timeout)
# expired first
TIMEOUT_REASONS = ("job timeout", "message unavailable (expired TTL)")
# Flower's own liveness timeout: no heartbeat for 2 x 30 s. The SuperLink answers the job
# "node unavailable", or drops the node from get_node_ids ("node vanished")
HEARTBEAT_REASONS = ("node unavailable", "node vanished")
HEARTBEAT_MIN_S = 30.0  # a heartbeat is sent every ~24 s: offline >= 36 s after a kill


class _ClientAppWatch:
    """Distinct ``flwr-clientapp`` processes a SuperNode has run, from the process table.

    The SuperNode starts one ClientApp process per message, and each one lives for the node's
    ``delay-s`` plus its imports (seconds), so polling every 0.3 s sees every one of them. This
    is state, not log text: it does not depend on how Flower words its log lines.
    """

    def __init__(self, cluster: LocalCluster, handle: SuperNodeHandle) -> None:
        self.cluster, self.handle = cluster, handle
        self.seen: set[int] = set()
        self.running: list[int] = []

    def poll(self) -> int:
        self.running = self.cluster.clientapp_pids(self.handle)
        self.seen.update(self.running)
        return len(self.seen)


def _wait_for(cond, timeout: float, what: str, cluster: LocalCluster, run_ids: dict) -> None:
    """Poll ``cond``; fail when the SuperLink dies or a run finishes first."""
    deadline = time.monotonic() + timeout
    next_status = time.monotonic() + 10.0
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert cluster.superlink is not None and cluster.superlink.alive, "SuperLink died"
        if time.monotonic() > next_status:  # a `flwr` CLI call costs CPU: not too often
            for name, run_id in run_ids.items():
                status = cluster.run_status(run_id)
                assert not str(status.get("status", "")).startswith("finished"), (
                    f"{name} run finished before {what}: {status}"
                )
            next_status = time.monotonic() + 10.0
        time.sleep(0.3)


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for key in ("node_id", "node", "job", "applied_in"):
            r[key] = int(r[key])
        r["duration"] = float(r["duration"])
        r["accepted"] = r["accepted"] == "True"
        r["valid"] = r["valid"] == "True"
    return rows


def _config(strategy: str, out: Path) -> dict:
    return {
        "strategy": strategy,
        "clock": "real",
        "num-server-rounds": ROUNDS,
        "min-train-nodes": 3,
        "local-steps": 5,
        "timeout": TIMEOUT,
        "max-failures": 1,
        "drain-timeout": TIMEOUT + 60.0,
        "wall-timeout": 900.0,
        "output-dir": str(out),
        "run-name": strategy,
        **STRATEGIES[strategy],
    }


@pytest.mark.timeout(1500)
def test_crash_and_join_during_fedbuff_and_fedcompass_runs(tmp_path):
    t0 = time.monotonic()
    with LocalCluster(tmp_path / "cluster") as cluster:
        cluster.start_superlink()
        nodes = cluster.add_supernodes(
            [{"partition-id": i, "num-partitions": 4, "delay-s": d} for i, d in enumerate(DELAYS)]
        )
        victim = nodes[2]
        run_ids = {s: cluster.flwr_run(APP, _config(s, tmp_path / s)) for s in STRATEGIES}
        t_run = time.monotonic()
        statuses: dict[str, dict] = {}
        try:
            # one ClientApp per run for the first jobs; a third one means a reply was handled
            # and the victim is training its next job (the third process is running now)
            watch = _ClientAppWatch(cluster, victim)
            _wait_for(
                lambda: watch.poll() >= len(STRATEGIES) + 1 and bool(watch.running),
                600,
                "the victim's next job",
                cluster,
                run_ids,
            )
            cluster.kill_supernode(victim)
            killed_at = time.monotonic() - t_run
            assert not any(p.tree() for p in victim.procs)
            newcomer = cluster.add_supernode(
                {"partition-id": 3, "num-partitions": 4, "delay-s": 0.2}
            )
            for name, run_id in run_ids.items():
                statuses[name] = cluster.wait_run(run_id, timeout=900)
        finally:
            for name, run_id in run_ids.items():
                log = cluster.flwr("log", str(run_id), "local-tls", "--show", check=False)
                (tmp_path / f"{name}-serverapp.log").write_text(log)
        wall = time.monotonic() - t_run
        for name, status in statuses.items():
            assert status["status"] == "finished:completed", (name, status, _tail(tmp_path, name))
    assert not cluster.leftovers(), "processes left running"
    print(
        f"\ncluster {t_run - t0:.0f} s, victim killed at {killed_at:.0f} s, runs done at {wall:.0f}"
        f" s, {time.monotonic() - t0:.0f} s in all"
    )
    for name in STRATEGIES:
        _check_run(tmp_path / name, name, nodes, victim, newcomer)


def _check_run(out: Path, name: str, nodes, victim, newcomer) -> None:
    info = json.loads((out / f"{name}-counters.json").read_text())
    counters, reasons = info["counters"], info["reasons"]
    rows = _rows(out / f"{name}-updates.csv")
    rep = check_run(out, name)
    print(f"{name}: {json.dumps(rep.as_dict())}; reasons {reasons}")
    assert info["stop_reason"] == "num_rounds reached", info
    assert counters["versions"] == ROUNDS

    # Every job sent has one row; every accepted update applied once or discarded with a
    # reason; the engine's ledger, counters and per-version commit metrics agree.
    assert rep.ok, rep.as_dict()
    assert rep.rows == rep.jobs_sent == counters["jobs-dispatched"]
    assert rep.lost == 0 and rep.duplicate_msg_ids == 0 and rep.duplicate_jobs == 0
    assert counters["jobs-unfinished"] == 0, "the drain should have ended every job"

    # The dead node: the jobs it finished before the kill were delivered; the last one (in
    # flight at the kill, or sent to it before the server noticed) was retired after its
    # timeout, never accepted; then the node itself was retired (max-failures=1).
    dead = sorted((r for r in rows if r["node_id"] == victim.node_id), key=lambda r: r["job"])
    assert dead, f"{name}: the victim got no job"
    *delivered, last = dead
    assert all(r["valid"] for r in delivered), dead
    assert not last["valid"] and last["applied_in"] == -1, last
    if last["reason"].startswith(TIMEOUT_REASONS):
        assert last["duration"] >= TIMEOUT - 2.0, last  # the TTL counts from its creation
    else:
        assert last["reason"].startswith(HEARTBEAT_REASONS), last
        assert last["duration"] >= HEARTBEAT_MIN_S, last
    assert counters["nodes-retired"] >= 1

    # The newcomer got work and delivered a valid update, keyed by its partition-id.
    new_rows = [r for r in rows if r["node_id"] == newcomer.node_id]
    assert [r for r in new_rows if r["valid"]], f"{name}: no valid update from the new node"
    assert {r["node"] for r in new_rows if r["valid"]} == {3}

    # The live nodes kept working; the model improved.
    for handle in nodes[:2]:
        assert any(r["node_id"] == handle.node_id and r["applied_in"] >= 1 for r in rows)
    evals = json.loads((out / f"{name}.json").read_text())["evaluate_metrics_serverapp"]
    assert evals[str(ROUNDS)]["loss"] < evals["0"]["loss"]


def _tail(tmp_path: Path, name: str, n: int = 3000) -> str:
    path = tmp_path / f"{name}-serverapp.log"
    return path.read_text()[-n:] if path.exists() else ""
