"""Per-seed table and plot of DP vs no-DP runs written by ``run_fedit.py`` (one file per seed).

Pairs the epsilon-8 rows of ``--dp`` files with the no-DP rows of ``--ref`` files by seed (the
seed also fixes the data split, so each pair saw the same data), prints a Markdown table with the
mean over seeds, and plots exact match per seed and category.

Usage::

    .venv/bin/python baselines/dp-lora/summarize_fedit.py \\
        --dp baselines/dp-lora/results_fedit_smollm2_ffa-lr0.08*.json \\
        --ref baselines/dp-lora/results_fedit_smollm2_fedit-recipe-seed*.json \\
        --plot baselines/dp-lora/fedit_smollm2_dp_vs_nodp.png
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def load(paths: list[Path], want_dp: bool) -> dict[int, dict]:
    """The DP (finite epsilon) or no-DP row of each file, keyed by the run's seed."""
    out: dict[int, dict] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        seed = int(payload["args"]["seed"])
        for row in payload["rows"]:
            if math.isinf(row["epsilon_target"]) != want_dp:
                if seed in out:
                    raise ValueError(f"two rows for seed {seed} ({path})")
                out[seed] = {**row, "file": path.name}
    return out


def table(dp: dict[int, dict], ref: dict[int, dict]) -> str:
    """Markdown: one line per seed (DP, no DP, gap) and the means."""
    cats = sorted({k[3:] for r in [*dp.values(), *ref.values()] for k in r["em_by_category"]})
    head = "| seed | DP eps spent | DP EM | no-DP EM | gap (points) | DP / no-DP EM " + (
        " / ".join(cats) + " | DP / no-DP eval loss |"
    )
    lines = [head, "|---:|---:|---:|---:|---:|---:|---:|"]
    seeds = sorted(set(dp) & set(ref))
    for s in seeds:
        d, r = dp[s], ref[s]
        em_d, em_r = d["em_by_category"], r["em_by_category"]
        per_cat = " / ".join(
            f"{100 * em_d[f'em-{c}']:.1f} vs {100 * em_r[f'em-{c}']:.1f}" for c in cats
        )
        lines.append(
            f"| {s} | {d['epsilon_spent']:.3f} | {100 * d['em']:.1f} % | {100 * r['em']:.1f} % "
            f"| {100 * (r['em'] - d['em']):.1f} | {per_cat} "
            f"| {d['eval_loss']:.3f} / {r['eval_loss']:.3f} |"
        )

    def mean(rows: dict[int, dict], key: str) -> float:
        return sum(rows[s][key] for s in seeds) / len(seeds)

    def std(rows: dict[int, dict], key: str) -> str:
        vals = [100 * rows[s][key] for s in seeds]
        return f" ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else ""

    gap = mean(ref, "em") - mean(dp, "em")
    lines.append(
        f"| **mean of {len(seeds)}** | | **{100 * mean(dp, 'em'):.1f} %{std(dp, 'em')}** "
        f"| **{100 * mean(ref, 'em'):.1f} %{std(ref, 'em')}** | **{100 * gap:.1f}** | "
        f"| {mean(dp, 'eval_loss'):.3f} / {mean(ref, 'eval_loss'):.3f} |"
    )
    return "\n".join(lines)


def plot(dp: dict[int, dict], ref: dict[int, dict], path: Path) -> None:
    """Grouped bars: exact match overall and per category, DP vs no DP, one group per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(set(dp) & set(ref))
    cats = sorted({k[3:] for r in dp.values() for k in r["em_by_category"]})
    keys = ["all", *cats]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), sharey=True)
    width = 0.38
    for ax, key in zip(axes, keys, strict=True):
        for j, (rows, label) in enumerate(((ref, "no DP"), (dp, "record-level eps 8"))):
            vals = [
                rows[s]["em"] if key == "all" else rows[s]["em_by_category"][f"em-{key}"]
                for s in seeds
            ]
            ax.bar([i + (j - 0.5) * width for i in range(len(seeds))], vals, width, label=label)
        ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds])
        ax.set_title("exact match, all" if key == "all" else key, fontsize=9)
        ax.set_ylim(0, 1.05)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=Path, nargs="+", required=True)
    ap.add_argument("--ref", type=Path, nargs="+", required=True)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    dp, ref = load(args.dp, want_dp=True), load(args.ref, want_dp=False)
    print(table(dp, ref))
    if args.plot:
        plot(dp, ref, args.plot)


if __name__ == "__main__":
    main()
