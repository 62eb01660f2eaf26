"""Quick in-process hyper-parameter search for the digits DP-SGD baseline (not the reported table).

Runs the same FedAvg recipe as ``digits_app.py`` in one process (no Ray) so a configuration
takes seconds: ``clients`` IID partitions, ``rounds`` x ``steps`` local (DP-)SGD steps,
:class:`flwr_ext.privacy.DPLoRAEngine` with the accountant restored from a fresh
``context.state`` record every round. Reads one JSON configuration per line on stdin, prints
one JSON result per line. The reported numbers come from ``run_digits.py`` (Flower simulations).

Keys: ``eps`` (0 = no DP), ``batch``, ``steps``, ``rounds``, ``lr``, ``clip``, ``mom``,
``width``, ``hidden``, ``act`` ("relu" | "tanh"), ``seed``.

Usage::

    echo '{"eps": 8, "batch": 360, "steps": 4, "rounds": 20, "lr": 20, "clip": 0.1,
           "width": 16, "hidden": 32, "act": "tanh"}' \\
        | .venv/bin/python baselines/dp-lora/search_digits.py
"""

from __future__ import annotations

import json
import math
import sys
import time

import torch
from digits_app import local_steps, make_model
from flwr.app import Context, RecordDict

from flwr_ext.data.images import load_partition, load_test_set, to_tensors
from flwr_ext.privacy import DPConfig
from flwr_ext.vision.train import evaluate


def local_round(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    state: RecordDict,
    dp: DPConfig | None,
    c: dict,
    rnd: int,
    pid: int,
) -> tuple[RecordDict, dict[str, float]]:
    """One client round of ``digits_app.local_steps``; ``state`` is all that survives rounds."""
    context = Context(0, 0, {}, state, {})
    metrics = local_steps(
        model,
        x,
        y,
        context,
        dp,
        lr=c["lr"],
        batch=c["batch"],
        steps=c["steps"],
        rounds=c["rounds"],
        round_seed=rnd * 100 + pid,
        momentum=c.get("mom", 0.0),
    )
    return context.state, metrics


def _model(c: dict) -> torch.nn.Module:
    return make_model(
        {
            "width": c.get("width", 32),
            "hidden": c.get("hidden", 64),
            "activation": c.get("act", "relu"),
        }
    )


def run(c: dict, seed: int = 0, clients: int = 4) -> tuple[float, float, float]:
    """Final test accuracy, epsilon spent and noise multiplier of one configuration."""
    torch.manual_seed(seed)
    parts = [
        to_tensors(load_partition("digits", i, clients, partitioner="iid", seed=0))
        for i in range(clients)
    ]
    xt, yt = to_tensors(load_test_set("digits", seed=0))
    dp = None if c["eps"] == 0 else DPConfig(c["eps"], delta=1e-5, max_grad_norm=c["clip"])
    global_model = _model(c)
    states = [RecordDict() for _ in parts]
    last: dict[str, float] = {}
    for rnd in range(1, c["rounds"] + 1):
        new = []
        for i, (x, y) in enumerate(parts):
            local = _model(c)
            local.load_state_dict(global_model.state_dict())
            states[i], m = local_round(local, x, y, states[i], dp, c, rnd, i)
            new.append(local.state_dict())
            last = m or last
        global_model.load_state_dict({k: sum(sd[k] for sd in new) / len(new) for k in new[0]})
    _, acc = evaluate(global_model, xt, yt)
    return acc, last.get("dp-epsilon", math.inf), last.get("dp-noise-multiplier", 0.0)


def main() -> None:
    torch.set_num_threads(1)
    for line in sys.stdin:
        if not line.strip():
            continue
        c = json.loads(line)
        seed = c.pop("seed", 0)
        t = time.time()
        acc, eps, sigma = run(c, seed)
        out = {**c, "seed": seed, "acc": round(acc, 4), "eps_spent": round(eps, 3)}
        out.update(sigma=round(sigma, 3), sec=round(time.time() - t, 1))
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
