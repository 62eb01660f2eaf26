"""The ``flwr-ext`` command: ``demo``, ``bench`` and ``report``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _cmd_demo(args: argparse.Namespace) -> int:
    from flwr_ext.demo import run_demo

    run_demo(
        out_dir=Path(args.out),
        quick=args.quick,
        backend=args.backend,
        check_engine=not args.no_engine_check,
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    bench_dir = Path(args.dir)
    scripts = sorted(bench_dir.glob("bench_*.py"))
    if args.only:
        scripts = [s for s in scripts if args.only in s.stem]
    if not scripts:
        print(f"no bench_*.py scripts under {bench_dir}", file=sys.stderr)
        return 2
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        runpy.run_path(str(script), run_name="__main__")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from flwr_ext.results import load_result

    for path in args.results:
        data = load_result(path)
        evals = data["evaluate_metrics_serverapp"]
        last = evals[max(evals, key=int)] if evals else {}
        print(f"{path}: {len(evals)} evaluations, last: {last}")
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
    bench.add_argument("--dir", default="bench", help="folder with bench_*.py scripts")
    bench.add_argument("--only", default="", help="run only scripts whose name contains this")
    bench.set_defaults(func=_cmd_bench)

    report = sub.add_parser("report", help="summarise result JSON files written by the apps")
    report.add_argument("results", nargs="+", help="result JSON files")
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flwr-ext`` console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
