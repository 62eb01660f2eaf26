"""Seed sweeps of ``apps/async-vision`` on a virtual clock, shared by the baselines.

A sweep runs, per seed, ONE simulation of the packaged app (:func:`flwr_ext.sim.run_app`) whose
ServerApp runs the app's own ``main`` once per *cell* (a set of server-side run-config keys:
device profile, time budget) and per *variant* (a strategy and its keys), each from the same
initial model with a fresh virtual clock. Server-side keys only: the ClientApp reads the data
keys, which must not differ between the cells of one simulation. Each simulation runs in a child
process (:func:`run_isolated`), the per-run files go to ``<runs>/<cell>-s<seed>/``, and the
results are aggregated over seeds (:func:`aggregate`, :func:`mean_sd`, :func:`plot_curves`).

Used by ``baselines/fedcompass/run.py``, ``baselines/async-zoo/run.py`` and
``baselines/unlimited-staleness/run.py``, which pass the app's ServerApp ``main``
(``app_main``): the library never imports an app.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: ``done.json`` marks a finished (cell, seed) directory.
DONE = "done.json"


def cell_dir(runs_dir: Path, cell: str, seed: int) -> Path:
    """``<runs_dir>/<cell>-s<seed>``."""
    return Path(runs_dir) / f"{cell}-s{seed}"


def is_done(runs_dir: Path, cell: str, seed: int) -> bool:
    """Whether the (cell, seed) run finished (its ``done.json`` exists)."""
    return (cell_dir(runs_dir, cell, seed) / DONE).exists()


def cells_server_app(
    cells: Mapping[str, Mapping[str, Any]],
    seed: int,
    runs_dir: Path,
    variants: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    app_main: Callable[[Any, Any], None],
):
    """A ServerApp that runs an app's own ServerApp ``main`` once per cell and variant.

    Parameters
    ----------
    cells : mapping
        Cell name -> server-side run-config keys (profile, ``max-time``, ``eval-period``, ...).
    seed : int
        Written to ``done.json`` (the run config carries the seed itself).
    runs_dir : Path
        Cell ``c`` writes to ``<runs_dir>/<c>-s<seed>/`` (the app's ``output-dir``) and marks
        it finished with ``done.json`` (wall seconds, seed, the run config).
    variants : mapping, optional
        Variant name -> run-config keys (``strategy`` and its settings). Each variant writes
        to ``<cell dir>/<variant>/``, so two variants of one strategy (FedBuff with and
        without a server optimizer) keep apart. ``None``: one run of the base run config
        (its ``strategy`` may list several, written side by side in the cell directory).
    app_main : callable
        The app's ServerApp ``main(grid, context)`` (e.g. ``async_vision.server_app.main``),
        called once per cell and variant with the cell's run config.
    """
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        base = dict(context.run_config)
        for cell, keys in cells.items():
            out = cell_dir(runs_dir, cell, seed)
            out.mkdir(parents=True, exist_ok=True)
            runs = {"": {}} if variants is None else variants
            t0 = time.time()
            for variant, vkeys in runs.items():
                dest = out / variant if variant else out
                cfg = {**base, **keys, **vkeys, "output-dir": str(dest)}
                context.run_config = cfg
                try:
                    app_main(grid, context)
                finally:
                    context.run_config = base
            config = {**base, **keys, "output-dir": str(out)}
            done = {"wall_s": time.time() - t0, "seed": seed, "config": config}
            if variants is not None:
                done["variants"] = {k: dict(v) for k, v in variants.items()}
            (out / DONE).write_text(json.dumps(done, indent=1, default=str))

    return app


def run_isolated(
    command: Callable[[list[str]], list[str]],
    cells: list[str],
    seed: int,
    runs_dir: Path,
    timeout: float,
    attempts: int = 2,
) -> float:
    """Run ``command(cells)`` in a child process (own session) until every cell is done.

    Ray can fail to start on an overloaded machine and a crashed simulation can hang; the
    child's whole process group is killed on ``timeout`` (seconds) so nothing is left running.
    A failed attempt is retried with the cells still missing. The cells' ``done.json`` of an
    earlier run is removed first, so that a re-run that fails is not taken for finished. The
    child's output goes to ``<runs_dir>/seed<seed>.log``. Returns the wall seconds of the last
    attempt (NaN if cells are still missing after ``attempts``).
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    todo = list(cells)
    for cell in todo:
        (cell_dir(runs_dir, cell, seed) / DONE).unlink(missing_ok=True)
    for attempt in range(1, attempts + 1):
        t0 = time.time()
        with (runs_dir / f"seed{seed}.log").open("a") as log:
            proc = subprocess.Popen(
                command(todo), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        todo = [c for c in todo if not is_done(runs_dir, c, seed)]
        if not todo:
            return time.time() - t0
        print(f"seed {seed}: attempt {attempt} failed (rc {proc.returncode})", flush=True)
    return float("nan")


def mean_sd(values: list[float], digits: int = 3) -> str:
    """``"m ± sd"`` (sample sd) of ``values``; the value alone for one, ``-`` for none."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return "-"
    if arr.size == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def aggregate(
    runs_dir: Path,
    cells: list[str],
    seeds: list[int],
    names: list[str],
    summarize: Callable[[Path, str], dict[str, Any]],
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per (cell, name): ``summarize(cell dir, name)`` of every seed whose cell finished.

    ``summarize`` raises ``FileNotFoundError`` for a name the cell did not run (skipped).
    """
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for cell in cells:
        out[cell] = {}
        for name in names:
            rows = []
            for seed in seeds:
                if not is_done(runs_dir, cell, seed):
                    continue
                try:
                    rows.append({"seed": seed, **summarize(cell_dir(runs_dir, cell, seed), name)})
                except FileNotFoundError:
                    continue
            out[cell][name] = rows
    return out


def mean_curve(curves: list[list[tuple[float, float]]], grid: np.ndarray) -> np.ndarray:
    """Mean over runs of step functions ``[(t, value), ...]`` (a value holds until the next)."""
    values = []
    for curve in curves:
        t, v = (np.asarray(x, dtype=float) for x in zip(*curve, strict=True))
        idx = np.searchsorted(t, grid, side="right") - 1
        values.append(np.where(idx >= 0, v[np.clip(idx, 0, None)], np.nan))
    return np.nanmean(np.vstack(values), axis=0)


def plot_curves(
    agg: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    path: Path,
    targets: tuple[float, ...],
    labels: Mapping[str, str] | None = None,
    key: str = "curve",
    ylabel: str = "test accuracy",
) -> Path:
    """Mean over seeds of ``row[key]`` against virtual time, one panel per cell (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or {}
    cells = [c for c in agg if any(agg[c].values())]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.6), squeeze=False)
    for ax, cell in zip(axes[0], cells, strict=True):
        for name, rows in agg[cell].items():
            curves = [r[key] for r in rows if r.get(key)]
            if not curves:
                continue
            grid = np.linspace(0.0, max(c[-1][0] for c in curves), 200)
            ax.plot(grid, mean_curve(curves, grid), label=labels.get(name, name), lw=1.5)
        for target in targets:
            ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set_title(cell)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
    n_seeds = max(len(r) for per in agg.values() for r in per.values())
    axes[0][0].set_ylabel(f"{ylabel} (mean of {n_seeds} seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
