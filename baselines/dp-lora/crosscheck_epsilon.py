"""Each DP baseline client's sample rate, noise multiplier and epsilon under RDP, PRV and PLD.

The DP runs calibrate sigma with one accountant (``dp.accountant``); this recomputes, per client,
``q = 1 / ceil(n / batch)`` (what Opacus' Poisson loader uses), the sigma that the run's
calibration gives for the planned steps, and the epsilon of that history under all three
accountants (Opacus RDP, Opacus PRV, Google's dp-accounting PLD), so a reader can see which
number each table reports and how far apart they are. No training.

Usage::

    .venv/bin/python baselines/dp-lora/crosscheck_epsilon.py --seeds 0 1 2 --accountant prv
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

from fedit_llm.config import validate  # noqa: E402

from flwr_ext.llm.models import load_tokenizer  # noqa: E402
from flwr_ext.llm.tasks import client_records, tokenize  # noqa: E402
from flwr_ext.privacy import calibrate_noise, compute_epsilon  # noqa: E402
from flwr_ext.sim import fused_run_config  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "apps" / "fedit-llm"

SMOLLM2_DP = {  # the DP command of baselines/dp-lora/README.md (SmolLM2 instruction task)
    "model": "smollm2",
    "template": "chat-short",
    "categories": "extract,convert,uppercase",
    "partitioner": "category",
    "categories-per-partition": 2,
    "max-length": 80,
    "num-train-examples": 3000,
    "num-eval-examples": 48,
    "num-server-rounds": 3,
    "local-steps": 3,
    "batch-size": 64,
}


def epsilons(sigma: float, q: float, steps: int, delta: float) -> dict[str, float]:
    """The epsilon of ``steps`` Poisson-subsampled Gaussian steps under each accountant."""
    h = [(sigma, q, steps)]
    return {a: round(compute_epsilon(h, delta, a), 4) for a in ("rdp", "prv", "pld")}


def smollm2_rows(seeds: list[int], accountant: str, eps: float, delta: float) -> list[dict]:
    tok = load_tokenizer("smollm2")
    rows = []
    for seed in seeds:
        cfg = validate(fused_run_config(APP, {**SMOLLM2_DP, "seed": seed}))
        steps = int(cfg["num-server-rounds"]) * int(cfg["local-steps"])
        for pid in range(3):
            n = len(tokenize(cfg, client_records(cfg, pid, 3), tok))
            q = 1.0 / math.ceil(n / int(cfg["batch-size"]))
            sigma = calibrate_noise(eps, delta, q, steps, accountant)
            rows.append(
                {"task": "smollm2", "seed": seed, "client": pid, "n": n, "q": round(q, 5),
                 "steps": steps, "sigma": round(sigma, 4), **epsilons(sigma, q, steps, delta)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--accountant", default="prv")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    # digits: q = 1 (expected batch = the whole partition), 20 rounds x 4 steps
    sigma = calibrate_noise(args.epsilon, args.delta, 1.0, 80, args.accountant)
    digits = {"task": "digits", "q": 1.0, "steps": 80, "sigma": round(sigma, 4)}
    print(json.dumps({**digits, **epsilons(sigma, 1.0, 80, args.delta)}), flush=True)
    smollm2_rows(args.seeds, args.accountant, args.epsilon, args.delta)


if __name__ == "__main__":
    main()
