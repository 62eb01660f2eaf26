"""How close each treatment of a stale update comes to the client's true fresh update (digits).

Thin wiring over :mod:`flwr_ext.staleness_conversion`. Setting (Wang, Gao et al., intertwined
heterogeneity): the global model is trained on the fast clients' classes 0-7 for ``T`` versions;
the slow client holds only classes 8-9 and trains from ``w^{t-tau}`` (the stale update). The
oracle is its update from ``w^t`` (what the reference's ``fixed.py`` retrains to decide). For
each ``tau`` and seed we report, against the oracle, the cosine and relative L2 error of: the
raw stale update, ``2^(-tau/20)`` and ``(1+tau)^(-1/2)`` scaling, DC-ASGD and the conversion, the
conversion's residual and CPU seconds, and whether the residual criterion agrees with the oracle
criterion (conversion error < stale error).

    OMP_NUM_THREADS=1 .venv/bin/python baselines/unlimited-staleness/measure_conversion.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from flwr_ext.data.images import _embedded_split, to_tensors
from flwr_ext.staleness import polynomial
from flwr_ext.staleness_conversion import (
    InversionConfig,
    LocalRecipe,
    convert_update,
    dc_asgd,
    exp2_weight,
)
from flwr_ext.vision import DigitsCNN, train_local

HERE = Path(__file__).resolve().parent


def _params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _client(params, x, y, recipe: LocalRecipe, seed: int) -> dict[str, np.ndarray]:
    model = DigitsCNN()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    train_local(
        model,
        x,
        y,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        momentum=recipe.momentum,
        seed=seed,
    )
    return {k: v - params[k] for k, v in _params(model).items()}


def _flat(d) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], np.float64).ravel() for k in sorted(d)])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--taus", default="5,20,40")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-residual", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    taus = [int(t) for t in args.taus.split(",")]
    recipe = LocalRecipe(steps=5, lr=0.05, batch_size=16)
    rows = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        x, y = to_tensors(_embedded_split(seed)[0])
        fast, slow = y < 8, y >= 8
        xf, yf, xs, ys = x[fast], y[fast], x[slow], y[slow]
        model = DigitsCNN()
        history = [_params(model)]
        for t in range(max(taus)):  # one version = 5 SGD steps on the fast clients' data
            train_local(model, xf, yf, steps=5, batch_size=16, lr=0.05, seed=seed * 1000 + t)
            history.append(_params(model))
        current = history[-1]
        for tau in taus:
            base = history[-1 - tau]
            stale = _client(base, xs, ys, recipe, seed)
            fresh = _client(current, xs, ys, recipe, seed)
            conv = convert_update(
                DigitsCNN,
                recipe,
                base,
                stale,
                current,
                input_shape=(1, 8, 8),
                num_classes=10,
                max_residual=args.max_residual,
                config=InversionConfig(
                    num_samples=args.samples, iterations=args.iterations, seed=seed
                ),
            )
            f = _flat(fresh)
            cands = {
                "stale": stale,
                "exp2": {k: v * exp2_weight(tau) for k, v in stale.items()},
                "poly": {k: v * polynomial(0.5)(tau) for k, v in stale.items()},
                "dc-asgd": dc_asgd(stale, current, base, lam=4.0),
                "conversion": conv.delta,
            }
            row = {
                "seed": seed,
                "tau": tau,
                "residual": conv.residual,
                "accepted": conv.accepted,
                "seconds": conv.seconds,
            }
            for name, d in cands.items():
                v = _flat(d)
                row[f"cos-{name}"] = float(v @ f / (np.linalg.norm(v) * np.linalg.norm(f)))
                row[f"err-{name}"] = float(np.linalg.norm(v - f) / np.linalg.norm(f))
            row["oracle-prefers-conversion"] = row["err-conversion"] < row["err-stale"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    (HERE / "conversion_quality.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
