"""The ``flwr-ext`` command: ``demo``, ``bench``, ``report``, ``run`` and ``stop-superlink``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

#: The source checkout this package runs from (an editable install); a wheel has no bench/.
CHECKOUT = Path(__file__).resolve().parents[1]


def _cmd_demo(args: argparse.Namespace) -> int:
    from flwr_ext.demo import run_demo

    run_demo(
        out_dir=Path(args.out),
        quick=args.quick,
        backend=args.backend,
        check_engine=not args.no_engine_check,
    )
    return 0


def find_bench_dir(given: str | None = None) -> Path | None:
    """The folder of ``bench_*.py`` scripts: ``given``, else ``./bench``, else the checkout's.

    Returns ``None`` when none of them holds a script (e.g. a wheel install outside a checkout).
    """
    if given:
        return Path(given)
    for cand in (Path.cwd() / "bench", CHECKOUT / "bench"):
        if any(cand.glob("bench_*.py")):
            return cand
    return None


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    bench_dir = find_bench_dir(args.dir)
    if bench_dir is None:
        print(
            "flwr-ext bench: no bench_*.py scripts in ./bench or in this package's checkout "
            f"({CHECKOUT / 'bench'}); the benchmarks ship with the source checkout, not the wheel: "
            "run from a checkout or pass --dir <checkout>/bench",
            file=sys.stderr,
        )
        return 2
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    if not scripts:
        what = f" matching {args.only!r}" if args.only else ""
        print(f"flwr-ext bench: no bench_*.py scripts{what} under {bench_dir}", file=sys.stderr)
        return 2
    argv = sys.argv
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        sys.argv = [str(script)]  # the script's own argparse sees no flwr-ext arguments
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
    return 0


REPORT_KINDS = (
    "a strategy result written by flwr_ext.results.save_result "
    "(<name>.json with evaluate_metrics_serverapp)",
    "an async engine counters file (<name>-counters.json with counters)",
    "an app summary (results.json of fedit-llm / sfprompt-llm, with rounds)",
)


def summarize_result(data: Any) -> str:
    """One line about a result JSON the apps write; ``ValueError`` for anything else."""
    if isinstance(data, dict) and isinstance(data.get("evaluate_metrics_serverapp"), dict):
        evals = data["evaluate_metrics_serverapp"]
        try:
            last = evals[max(evals, key=int)] if evals else {}
        except ValueError:
            raise ValueError("evaluate_metrics_serverapp keys are not round numbers") from None
        return f"{len(evals)} evaluations, last: {last}"
    if isinstance(data, dict) and isinstance(data.get("counters"), dict):
        counters = ", ".join(f"{k} {v}" for k, v in data["counters"].items())
        stop = data.get("stop_reason")
        reasons = data.get("reasons") or {}
        out = f"engine counters: {counters}"
        if reasons:
            out += "; rejected: " + ", ".join(f"{k} {v}" for k, v in reasons.items())
        return out + (f"; stopped: {stop}" if stop else "")
    if isinstance(data, dict) and isinstance(data.get("rounds"), list):
        rows = data["rounds"]
        last = rows[-1] if rows else {}
        keep = {k: v for k, v in last.items() if not isinstance(v, dict | list)}
        return f"{len(rows)} rounds, last: {keep}"
    raise ValueError("not a result file flwr-ext knows; expected " + "; or ".join(REPORT_KINDS))


def _cmd_report(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.results:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            line = "no such file"
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
            line = f"cannot read it ({type(exc).__name__})"
        else:
            try:
                line = summarize_result(json.loads(text))
            except json.JSONDecodeError as exc:
                line = f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            except ValueError as exc:
                line = str(exc)
            else:
                print(f"{path}: {line}")
                continue
        failed += 1
        print(f"flwr-ext report: {path}: {line}", file=sys.stderr)
    return 1 if failed else 0


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def local_superlink_pids(flwr_home: str | Path | None = None) -> list[int]:
    """PIDs of the SuperLinks that ``flwr run`` started for ``flwr_home`` (this user's only).

    ``flwr run`` on the ``local`` connection starts ``flower-superlink --simulation ... --log-file
    $FLWR_HOME/local-superlink/superlink.log`` in the background and has no stop command
    (Flower 1.42). That log path identifies the SuperLink of one Flower home: other users' and
    other homes' SuperLinks never match. ``flwr_home`` defaults to ``$FLWR_HOME`` or ``~/.flwr``
    (Flower's own rule). Linux (``/proc``) only; elsewhere the list is empty.
    """
    from flwr.supercore.utils import get_flwr_home

    home = Path(flwr_home) if flwr_home is not None else get_flwr_home()
    log_file = str(home.expanduser().resolve() / "local-superlink" / "superlink.log")
    uid = os.getuid()
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        argv = _cmdline(int(entry.name))
        if not any(Path(a).name == "flower-superlink" for a in argv[:2]):
            continue
        if "--log-file" not in argv:
            continue
        i = argv.index("--log-file")
        if i + 1 < len(argv) and str(Path(argv[i + 1]).resolve()) == log_file:
            pids.append(int(entry.name))
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _cmdline(pid) != []  # a zombie has an empty cmdline


def stop_local_superlink(flwr_home: str | Path | None = None, timeout: float = 10.0) -> list[int]:
    """Stop the SuperLinks of :func:`local_superlink_pids`; return their PIDs.

    SIGTERM, then SIGKILL after ``timeout`` seconds. The SuperLink runs in its own session
    (Flower starts it detached), so its process group (the ServerApp and SuperNode processes it
    spawned) is signalled with it; a SuperLink that shares its group with others gets only its
    own signal.
    """
    pids = local_superlink_pids(flwr_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)
        if not any(_alive(p) for p in pids):
            break
    return pids


def _cmd_stop_superlink(args: argparse.Namespace) -> int:
    from flwr.supercore.utils import get_flwr_home

    home = Path(args.flwr_home) if args.flwr_home else get_flwr_home()
    pids = stop_local_superlink(home)
    if not pids:
        print(f"no local SuperLink of FLWR_HOME={home} is running")
    for pid in pids:
        print(f"stopped the local SuperLink of FLWR_HOME={home} (pid {pid})")
    return 0


_RUN_ID = re.compile(r"Successfully started run (\d+)")


def run_status(run_id: int, connection: str | None = None) -> tuple[str, str]:
    """``(status, details)`` of a run from ``flwr ls --run-id <id> --format json``."""
    import subprocess

    cmd = [_flwr(), "ls", *([connection] if connection else []), "--run-id", str(run_id)]
    proc = subprocess.run([*cmd, "--format", "json"], capture_output=True, text=True)
    out = proc.stdout
    try:
        data = json.loads(out[out.index("{") :])
        row = data["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "unknown", (out + proc.stderr).strip()[-500:]
    return str(row.get("status", "unknown")), str(row.get("status-details", ""))


def _flwr() -> str:
    exe = Path(sys.executable).parent / "flwr"
    return str(exe) if exe.exists() else "flwr"


def _cmd_run(args: argparse.Namespace) -> int:
    """``flwr run <app> [connection] ... --stream``, then exit non-zero unless it completed."""
    import subprocess

    extra = list(args.flwr_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    connection = extra[0] if extra and not extra[0].startswith("-") else None
    cmd = [_flwr(), "run", args.app, *extra]
    if "--stream" not in cmd:
        cmd.append("--stream")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        m = _RUN_ID.search(line)
        if m and run_id is None:
            run_id = int(m.group(1))
    rc = proc.wait()
    if rc != 0:
        return rc
    if run_id is None:
        print("flwr-ext run: flwr run did not report a run id", file=sys.stderr)
        return 1
    status, details = run_status(run_id, connection)
    if status != "finished:completed":
        print(f"flwr-ext run: run {run_id} ended {status}: {details}", file=sys.stderr)
        return 1
    print(f"flwr-ext run: run {run_id} {status}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``flwr-ext``."""
    parser = argparse.ArgumentParser(
        prog="flwr-ext",
        description="flwr-ext: asynchronous aggregation, compression, DP-LoRA and "
        "federated LLM tuning on Flower's engines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo", help="run the async-vision comparison on the embedded digits data"
    )
    demo.add_argument("--out", default="outputs/demo", help="directory for CSV, JSON and PNG")
    demo.add_argument("--quick", action="store_true", help="fewer clients and updates")
    demo.add_argument(
        "--backend",
        choices=["inline", "simulation"],
        default="inline",
        help="inline (default: virtual clock in one process, results identical to the "
        "Simulation Engine) or simulation (Flower's Simulation Engine, Ray)",
    )
    demo.add_argument(
        "--no-engine-check",
        action="store_true",
        help="skip the short real Simulation Engine run that checks inline against it",
    )
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="run the benchmarks under bench/ (ratios, one run)")
    bench.add_argument(
        "--dir",
        default=None,
        help="folder with bench_*.py scripts (default: ./bench, else this checkout's bench/)",
    )
    bench.add_argument("--only", default="", help="run only scripts whose name contains this")
    bench.set_defaults(func=_cmd_bench)

    report = sub.add_parser(
        "report",
        help="summarise result JSON files written by the apps",
        description="Each file is one of: " + "; ".join(REPORT_KINDS) + ".",
    )
    report.add_argument("results", nargs="+", help="result JSON files")
    report.set_defaults(func=_cmd_report)

    run = sub.add_parser(
        "run",
        help="flwr run --stream, then exit 1 unless the run finished:completed",
        description="Flower 1.42's `flwr run` exits 0 once a run is submitted, even when the "
        "ServerApp then raises. This runs `flwr run <app> <args> --stream`, then reads the run's "
        "status with `flwr ls --run-id <id>` and exits 1 unless it is finished:completed.",
    )
    run.add_argument("app", help="the Flower app directory (e.g. apps/async-vision)")
    run.add_argument(
        "flwr_args", nargs=argparse.REMAINDER, help="passed to flwr run (connection, options)"
    )
    run.set_defaults(func=_cmd_run)

    stop = sub.add_parser(
        "stop-superlink",
        help="stop the local SuperLink that `flwr run` left running for this FLWR_HOME",
    )
    stop.add_argument("--flwr-home", default=None, help="default: $FLWR_HOME or ~/.flwr")
    stop.set_defaults(func=_cmd_stop_superlink)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flwr-ext`` console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
