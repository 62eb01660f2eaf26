"""Load test: one TLS + node-auth SuperLink on loopback, 5 then 20 SuperNodes, async strategy.

One cluster per invocation: a SuperLink and the smallest number of SuperNodes start; one run per
size is submitted with ``flwr run`` (FedAsync by default, real clock, ended by its
``wall-timeout``); between runs more registered SuperNodes join, so every size is measured on the
same SuperLink, side by side. The app is ``bench/apps/light-async`` (numpy softmax regression on
sklearn digits: no torch), so the ClientApp processes, one per message, stay cheap and the
figures describe the server. Reported per size:

* applied updates per second over the engine's wall time (``strategy.start`` to its return);
* server CPU seconds over that window: the ServerApp process's own CPU time around
  ``strategy.start`` (``time.process_time``, exact), plus the SuperLink's other processes
  (the ``flower-superlink`` HTTP server and its SuperExec), utime+stime from
  ``/proc/<pid>/stat`` sampled every 0.5 s from the ServerApp's "started" marker to its
  result files. Start-up (imports, FAB install) is outside the window;
* server CPU per applied update, and its ratio largest vs smallest size;
* the engine's own CPU per applied update (``engine-cpu-ms-per-update`` of the engine's
  counters: ``time.thread_time`` around the handling of each reply: validation, decoding, the
  strategy's aggregation, commit; no Grid I/O, no evaluation), the engine loop's CPU
  (``server-cpu-s``: also message building, push/pull and polling), and the ServerApp
  process's CPU (``time.process_time``, all its threads), each per applied update with its
  ratio largest vs smallest size;
* the SuperLink's idle CPU rate with the N SuperNodes connected and no run (measured for
  ``--idle-seconds`` just before each run: heartbeats and the SuperNodes' polling), and the
  marginal server CPU per applied update: (server CPU - idle rate x window) / applied;
* client cost per message: the CPU time of each ``flwr-clientapp`` process when it returns its
  reply (imports + training), from the ClientApps' reply logs;
* exactly-once (:func:`flwr_ext.deploy.ledger.check_run`): the engine's ledger, per-update CSV,
  counters and commit metrics agree, no accepted update lost or applied twice, no duplicate
  or unknown replies, and every ledger entry was sent by a ClientApp (reply-log witness).

The load average (``/proc/loadavg``) before and after each run is printed with the figures:
on a shared machine they move with it. Bounded: at most 40 SuperNodes and 900 s per run;
loopback only; every process is stopped at the end, also on error.

With ``--in-process`` no Flower process is started: the same strategy runs on
:class:`flwr_ext.asyncfl.testing.FakeGrid` (the light app's model, clients that add 0.01 to it)
for ``--updates`` applied updates per size, ``--reps`` times, and only the engine's CPU per
applied update is printed (its handling of replies without SuperLink, network or load noise).

Usage::

    python bench/bench_deploy_load.py [--sizes 5 20] [--seconds 90] [--strategy fedasync]
        [--isolation subprocess|process] [--poll-interval 0.02] [--json out.json]
    python bench/bench_deploy_load.py --in-process [--sizes 5 20] [--updates 400] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from flwr_ext.deploy import LocalCluster, ManagedProcess
from flwr_ext.deploy.ledger import check_run
from flwr_ext.deploy.procs import proc_info

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "bench" / "apps" / "light-async"


def loadavg() -> float:
    """The 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class CpuMeter:
    """CPU time of a process tree (minus excluded commands), sampled.

    A process keeps its last reading after it exits; readings count from :meth:`mark`.
    """

    def __init__(self, proc: ManagedProcess, exclude: bytes = b"flwr-serverapp") -> None:
        self.proc = proc
        self.exclude = exclude
        self.last: dict[tuple[int, int], float] = {}
        self.base: dict[tuple[int, int], float] = {}

    def sample(self) -> None:
        """Read the CPU time of every live process of the tree."""
        for pid in self.proc.tree():
            info = proc_info(pid)
            if info is not None and self.exclude not in _cmdline(pid):
                self.last[(pid, info.start_ticks)] = info.cpu_seconds

    def mark(self) -> None:
        """Start of the window."""
        self.sample()
        self.base = dict(self.last)

    def seconds(self) -> float:
        """CPU seconds since :meth:`mark`."""
        return sum(v - self.base.get(k, 0.0) for k, v in self.last.items())


def _wait_file(path: Path, deadline: float, cluster: LocalCluster, meter: CpuMeter) -> None:
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path.name} not written in time")
        assert cluster.superlink is not None
        if not cluster.superlink.alive:
            raise RuntimeError(f"SuperLink died:\n{cluster.superlink.tail()}")
        meter.sample()
        time.sleep(0.5)


def run_size(cluster: LocalCluster, n: int, args: argparse.Namespace, workdir: Path) -> dict:
    """Grow ``cluster`` to ``n`` SuperNodes, run the app for ``args.seconds``; return figures."""
    out = workdir / f"out-{n}"
    name = args.strategy
    assert cluster.superlink is not None
    idle = CpuMeter(cluster.superlink)
    idle.mark()
    t_idle = time.monotonic()
    while time.monotonic() - t_idle < args.idle_seconds:
        time.sleep(0.5)
    idle.sample()
    idle_rate = idle.seconds() / max(time.monotonic() - t_idle, 1e-9)
    load0 = loadavg()
    meter = CpuMeter(cluster.superlink)
    run_id = cluster.flwr_run(
        APP,
        {
            "strategy": name,
            "clock": "real",
            "num-server-rounds": 10**6,
            "wall-timeout": float(args.seconds),
            "min-train-nodes": n,
            "local-steps": args.local_steps,
            "eval-every": 10**6,
            "timeout": float(args.seconds) + 60,
            "buffer-size": args.buffer_size,
            "poll-interval": args.poll_interval,
            "output-dir": str(out),
        },
    )
    deadline = time.monotonic() + args.seconds + 600
    _wait_file(out / f"{name}-started.json", deadline, cluster, meter)
    meter.mark()
    _wait_file(out / f"{name}-counters.json", deadline, cluster, meter)
    meter.sample()
    superlink_cpu = meter.seconds()
    status = cluster.wait_run(run_id, timeout=120, poll=2.0)
    info = json.loads((out / f"{name}-counters.json").read_text())
    max_pending = args.buffer_size - 1 if name == "fedbuff" else 0
    replies = workdir / "replies"
    rep = check_run(out, name, client_log=replies, run_id=run_id, max_pending=max_pending)
    wall, app_cpu = info["serverapp-wall-s"], info["serverapp-cpu-s"]
    cpu = superlink_cpu + app_cpu
    nan = float("nan")
    c = info["counters"]

    def per_update(seconds: float) -> float:
        return 1000 * seconds / rep.applied if rep.applied else nan

    return {
        "supernodes": n,
        "status": status.get("status", "?"),
        "stop-reason": info["stop_reason"],
        "window-s": wall,
        "applied": rep.applied,
        "applied-per-s": rep.applied / wall,
        "serverapp-cpu-s": app_cpu,
        "superlink-cpu-s": superlink_cpu,
        "server-cpu-s": cpu,
        "server-cpu-util": cpu / wall,
        "server-cpu-ms-per-update": per_update(cpu),
        "engine-cpu-ms-per-update": per_update(c["engine-cpu-s"]),
        "loop-cpu-ms-per-update": per_update(c["server-cpu-s"]),
        "serverapp-cpu-ms-per-update": per_update(app_cpu),
        "superlink-idle-cpu-per-s": idle_rate,
        "server-cpu-ms-per-update-marginal": (
            1000 * (cpu - idle_rate * wall) / rep.applied if rep.applied else nan
        ),
        "clientapp-cpu-s-mean": statistics.fmean(rep.client_cpu_s) if rep.client_cpu_s else nan,
        "load-before": load0,
        "load-after": loadavg(),
        **{f"ledger-{k}": v for k, v in rep.as_dict().items()},
    }


def engine_cpu_in_process(sizes: list[int], strategy: str, updates: int, reps: int) -> None:
    """Print the engine's CPU per applied update on an in-process Grid, per size and repetition."""
    import sys

    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    from flwr_ext.asyncfl import RealClock
    from flwr_ext.asyncfl.testing import FakeGrid
    from flwr_ext.strategies import build_strategy

    sys.path.insert(0, str(APP))
    from light_async.task import init_params

    def client_fn(pid: int, msg) -> RecordDict:
        new = {k: v.numpy() + 0.01 for k, v in msg.content["arrays"].items()}
        metrics = MetricRecord({"num-examples": 10, "partition-id": pid})
        return RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}), "metrics": metrics}
        )

    init = ArrayRecord({k: Array(v) for k, v in init_params().items()})
    for rep in range(reps):
        per = {}
        for n in sizes:
            res = build_strategy({"strategy": strategy}).start(
                FakeGrid(client_fn, n, seed=rep, per_pull=1),
                init,
                num_rounds=updates,
                clock=RealClock(),
                poll_interval=0,
            )
            per[n] = res.counters["engine-cpu-ms-per-update"]
        figures = ", ".join(f"{n} nodes {v:.3f} ms" for n, v in per.items())
        ratio = per[sizes[-1]] / per[sizes[0]]
        print(f"rep {rep}: engine CPU per applied update: {figures}; ratio {ratio:.2f}x")


def main() -> None:
    """Start one cluster, run each size, print a table and the largest-vs-smallest ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--strategy", default="fedasync", choices=["fedasync", "fedbuff"])
    parser.add_argument("--buffer-size", type=int, default=4, help="FedBuff K")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--poll-interval", type=float, default=0.02)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--isolation", default="subprocess", choices=["subprocess", "process"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here")
    parser.add_argument("--in-process", action="store_true", help="FakeGrid, engine CPU only")
    parser.add_argument("--updates", type=int, default=400, help="--in-process: versions")
    parser.add_argument("--reps", type=int, default=3, help="--in-process: repetitions")
    args = parser.parse_args()
    sizes = sorted(set(args.sizes))
    if args.in_process:
        engine_cpu_in_process(sizes, args.strategy, args.updates, args.reps)
        return
    if sizes[-1] > 40 or sizes[0] < 1 or args.seconds > 900:
        raise SystemExit("bounded: 1 to 40 SuperNodes and at most 900 s per run")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        base = args.workdir or Path(tmp)
        (base / "replies").mkdir(parents=True, exist_ok=True)
        cluster = LocalCluster(base / "cluster", isolation=args.isolation)
        try:
            cluster.start_superlink()
            for n in sizes:
                have = len(cluster.supernodes)
                t0 = time.monotonic()
                log = str(base / "replies")
                cluster.add_supernodes(
                    [
                        {"partition-id": i, "num-partitions": sizes[-1], "reply-log": log}
                        for i in range(have, n)
                    ]
                )
                res = run_size(cluster, n, args, base)
                res["join-s"] = time.monotonic() - t0 - res["window-s"]
                res["isolation"] = args.isolation
                results.append(res)
                print(json.dumps(res), flush=True)
        finally:
            cluster.stop_all()
        left = cluster.leftovers()
    cols = [
        ("supernodes", "d"),
        ("applied", "d"),
        ("window-s", ".1f"),
        ("applied-per-s", ".2f"),
        ("server-cpu-s", ".2f"),
        ("server-cpu-util", ".2f"),
        ("server-cpu-ms-per-update", ".1f"),
        ("engine-cpu-ms-per-update", ".2f"),
        ("loop-cpu-ms-per-update", ".2f"),
        ("serverapp-cpu-ms-per-update", ".1f"),
        ("superlink-idle-cpu-per-s", ".3f"),
        ("server-cpu-ms-per-update-marginal", ".1f"),
        ("clientapp-cpu-s-mean", ".2f"),
        ("ledger-lost", "d"),
        ("ledger-ok", ""),
        ("load-before", ".1f"),
        ("load-after", ".1f"),
    ]
    print(" ".join(f"{c:>{len(c)}}" for c, _ in cols))
    for r in results:
        print(" ".join(f"{r[c]!s:>{len(c)}}" if not f else f"{r[c]:>{len(c)}{f}}" for c, f in cols))
    summary: dict = {"results": results, "leftover-processes": len(left)}
    if len(results) >= 2 and all(r["applied"] for r in results):
        lo, hi = results[0], results[-1]
        ratio = hi["server-cpu-ms-per-update"] / lo["server-cpu-ms-per-update"]
        key = "server-cpu-ms-per-update-marginal"
        marginal = hi[key] / lo[key]
        summary["ratio"] = {"hi": hi["supernodes"], "lo": lo["supernodes"], "value": ratio}
        summary["ratio-marginal"] = marginal
        for key in (
            "engine-cpu-ms-per-update",
            "loop-cpu-ms-per-update",
            "serverapp-cpu-ms-per-update",
        ):
            summary[f"ratio-{key}"] = hi[key] / lo[key]
            print(f"{key}, {hi['supernodes']} vs {lo['supernodes']}: {hi[key] / lo[key]:.2f}x")
        print(
            f"server CPU per applied update, {hi['supernodes']} vs {lo['supernodes']} "
            f"SuperNodes: {ratio:.2f}x (marginal, idle rate removed: {marginal:.2f}x; "
            f"load {lo['load-before']:.1f}-{hi['load-after']:.1f})"
        )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if left:
        raise SystemExit(f"processes left running: {left}")
    idle = [r["supernodes"] for r in results if not r["applied"]]
    if idle:
        raise SystemExit(f"no update applied with {idle} SuperNodes: raise --seconds")
    bad = [r["supernodes"] for r in results if not r["ledger-ok"]]
    if bad:
        raise SystemExit(f"ledger check failed (lost/duplicated/mismatch) at sizes {bad}")


if __name__ == "__main__":
    main()
