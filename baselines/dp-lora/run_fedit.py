"""Utility vs record-level epsilon on the federated instruction task (the fedit-llm app).

Every point is a real Flower simulation of the packaged ``apps/fedit-llm`` app
(``flwr_ext.sim.run_app`` with ``fused_run_config``), the same code ``flwr run`` starts, with
``dp.target-epsilon`` set (``inf`` = DP off). Each client runs record-level DP-SGD on its LoRA
adapter (Opacus hooks mode, per-example clipping at ``dp.max-grad-norm``, Poisson sampling), the
noise multiplier calibrated once for the whole run, the accountant kept in ``context.state``.
Utility: held-out response loss and exact match of the final global adapter.

Accounting: RDP (Mironov 2017) via Opacus, delta 1e-5, add/remove-one-example adjacency,
composed over all ``rounds x local-steps`` DP-SGD steps of each client.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python baselines/dp-lora/run_fedit.py --model tiny
    HF_HUB_OFFLINE=1 .venv/bin/python baselines/dp-lora/run_fedit.py --model smollm2 \\
        --rounds 2 --steps 4 --batch 4 --train 120 --eval 14 --epsilons 8 inf

The SmolLM2 configuration of ``baselines/fedit`` (template, categories, category partitions)
is passed through ``--set``; see ``baselines/dp-lora/README.md`` for the exact command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedit_llm.client_app import app as client_app  # noqa: E402
from fedit_llm.server_app import app as server_app  # noqa: E402

from flwr_ext.sim import fused_run_config, run_app  # noqa: E402

APP = Path(__file__).resolve().parents[2] / "apps" / "fedit-llm"
HERE = Path(__file__).resolve().parent


def overrides(args: argparse.Namespace) -> dict:
    """Run-config overrides shared by every point of the sweep."""
    small = args.model == "tiny"
    return {
        "model": args.model,
        "template": "alpaca" if small else "chat",
        "num-train-examples": args.train,
        "num-eval-examples": args.eval,
        "num-server-rounds": args.rounds,
        "local-steps": args.steps,
        "batch-size": args.batch,
        "learning-rate": args.lr,
        "min-learning-rate": args.lr / 3,
        "lora-r": args.r,
        "lora-alpha": 2.0 * args.r,
        "lora-targets": args.targets,
        "eval-max-new-tokens": args.new_tokens,
        "eval-num-samples": 0,
        "checkpoint-every": 0,
        "progress": False,
        "seed": args.seed,
        "dp.delta": args.delta,
        "dp.max-grad-norm": args.clip,
        **dict(_parse_set(kv) for kv in args.set),
    }


def _parse_set(kv: str) -> tuple[str, object]:
    """``KEY=VALUE`` from ``--set`` as a run-config item (int, float, bool or string)."""
    key, _, value = kv.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key, value.lower() == "true"
    return key, value


def run(eps: float, args: argparse.Namespace) -> dict:
    """One simulation at budget ``eps``; the final round's utility and privacy figures."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = fused_run_config(
            APP,
            {
                **overrides(args),
                "output-dir": tmp,
                "dp.target-epsilon": 0.0 if math.isinf(eps) else eps,
            },
        )
        t = time.time()
        run_app(server_app, client_app, num_supernodes=args.clients, run_config=cfg)
        res = json.loads((Path(tmp) / "results.json").read_text())
    first, last = res["rounds"][0], res["rounds"][-1]
    return {
        "epsilon_target": eps,
        "epsilon_spent": last.get("train/dp-epsilon-max", math.inf),
        "noise_multiplier": last.get("train/dp-noise-multiplier", 0.0),
        "dp_steps": last.get("train/dp-steps", 0),
        "eval_loss_start": first["eval-loss"],
        "eval_loss": last["eval-loss"],
        "em": last.get("em", float("nan")),
        "em_by_category": {k: v for k, v in last.items() if k.startswith("em-")},
        "seconds": round(time.time() - t, 1),
    }


def table(rows: list[dict]) -> str:
    """Markdown table of a sweep (exact match per category when the task has categories)."""
    cats = sorted({k[3:] for r in rows for k in r["em_by_category"]})
    per_cat = f" | EM {' / '.join(cats)}" if cats else ""
    out = [
        "| target epsilon | epsilon spent (RDP) | noise multiplier | eval loss (start -> end)"
        f" | exact match{per_cat} | time |",
        "|---:|---:|---:|---:|---:|" + ("---:|" if cats else "") + "---:|",
    ]
    for r in rows:
        if math.isinf(r["epsilon_target"]):
            eps, spent, sigma = "no DP", "-", "-"
        else:
            eps, spent = f"{r['epsilon_target']:g}", f"{r['epsilon_spent']:.3f}"
            sigma = f"{r['noise_multiplier']:.3f}"
        ems = " / ".join(f"{100 * r['em_by_category'].get(f'em-{c}', math.nan):.1f}" for c in cats)
        out.append(
            f"| {eps} | {spent} | {sigma} | {r['eval_loss_start']:.3f} -> {r['eval_loss']:.3f} "
            f"| {100 * r['em']:.1f} %{' | ' + ems + ' %' if cats else ''} | {r['seconds']:.0f} s |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Eval loss (and exact match, when measured) against the epsilon spent; no DP dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp_rows = [r for r in rows if not math.isinf(r["epsilon_target"])]
    panels = [("eval_loss", "held-out response loss (lower is better)")]
    if any(r["em"] > 0 for r in rows):
        panels.append(("em", "held-out exact match"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        ax.plot(
            [r["epsilon_spent"] for r in dp_rows],
            [r[key] for r in dp_rows],
            "o-",
            label="DP-SGD on LoRA (RDP, delta 1e-5)",
        )
        for r in rows:
            if math.isinf(r["epsilon_target"]):
                ax.axhline(r[key], color="gray", ls="--", label="no DP")
        if key == "eval_loss":
            ax.axhline(rows[0]["eval_loss_start"], color="red", ls=":", lw=0.8, label="start")
        ax.set_xscale("log")
        ax.set_xlabel("record-level epsilon spent over the whole run")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0, math.inf])
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="DP-SGD steps per round")
    ap.add_argument("--batch", type=int, default=8, help="expected (Poisson) batch size")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=28)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other fedit-llm run-config key (repeatable; overrides the keys above)",
    )
    ap.add_argument("--tag", default="", help="suffix of the output files' names")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"fedit_{args.model}{'_' + args.tag if args.tag else ''}"
    for eps in args.epsilons:
        rows.append(run(eps, args))
        print(json.dumps(rows[-1]), flush=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
        (args.out / f"results_{stem}.json").write_text(json.dumps(payload, indent=1))
    title = f"fedit-llm ({args.model}): utility vs epsilon"
    plot(rows, args.out / f"{stem}_utility_vs_epsilon.png", title)
    print(table(rows))


if __name__ == "__main__":
    main()
