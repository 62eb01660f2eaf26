"""The tuning run behind two settings of ``run.py``'s ``VARIANTS`` (writes ``tuning.json``).

FedBuff + Adaptive Braking: server lr in {0.1, 0.3, 1.0} x rho in {0, 1, 2} (rho = 0 is plain
server momentum 0.9, for reference; the pick needs rho > 0). FedFix: server lr in {0.35, 0.7}.
One simulation: the ``exponential`` profile, seed 3 (not one of the sweep's seeds), 0.4 of its
budget (16 virtual s); the pick is the highest final accuracy. The picks were copied into
``VARIANTS`` by hand before the sweep.

Usage::

    .venv/bin/python baselines/async-zoo/tune.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 3
PROFILE = "exponential"
FRACTION = 0.4


def _zoo():
    spec = importlib.util.spec_from_file_location("async_zoo_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["async_zoo_run"] = mod
    spec.loader.exec_module(mod)
    return mod


def grid() -> dict[str, dict]:
    """Variant name -> run-config keys of every tuned setting."""
    out = {}
    ab = {"strategy": "fedbuff", "server-opt": "adaptive-braking"}
    for lr in (0.1, 0.3, 1.0):
        for rho in (0.0, 1.0, 2.0):
            out[f"ab-lr{lr}-rho{rho}"] = {**ab, "server-lr": lr, "server-opt-rho": rho}
    for lr in (0.35, 0.7):
        out[f"fedfix-lr{lr}"] = {"strategy": "fedfix", "server-lr": lr}
    return out


def main(out: Path = HERE / "tuning") -> dict:
    """Run the grid, write ``tuning.json`` next to this file, return it."""
    zoo = _zoo()
    zoo.VARIANTS.clear()
    zoo.VARIANTS.update(grid())
    zoo.QUICK_FRACTION = FRACTION
    t0 = time.time()
    zoo.run_one([PROFILE], SEED, out / "runs", True, "inline", 2, None)
    cell = out / "runs" / f"{PROFILE}-s{SEED}"
    runs = {}
    for name, keys in zoo.VARIANTS.items():
        r = zoo.summarize_variant(cell, name)
        runs[name] = {**keys, "final": r["final_accuracy"], "best": r["best_accuracy"]}
        runs[name] |= {"t80": r["time_to_80"], "t90": r["time_to_90"]}
    ab = [n for n in runs if n.startswith("ab-") and runs[n]["server-opt-rho"] > 0]
    fix = [n for n in runs if n.startswith("fedfix")]
    pick = {
        "fedbuff-ab": max(ab, key=lambda n: runs[n]["final"]),
        "fedfix": max(fix, key=lambda n: runs[n]["final"]),
    }
    result = {"profile": PROFILE, "seed": SEED, "budget_fraction": FRACTION, "runs": runs}
    result |= {"pick": pick, "wall_s": time.time() - t0}
    (HERE / "tuning.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    res = main()
    for name, row in res["runs"].items():
        print(name, {k: row[k] for k in ("final", "best", "t80", "t90")})
    print("pick:", res["pick"])
