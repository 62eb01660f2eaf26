"""The inline backend's promise: the same results as Flower's Simulation Engine, bit for bit.

One seeded ``apps/async-vision`` configuration runs the four asynchronous strategies one after
the other (FedAsync, FedBuff, FedCompass, FedAvg timed) in ONE real Simulation Engine run (Ray)
and inline (in-process, and with a pool of 2 worker processes), without compression and with
``fedzip`` (whose client mod keeps its error feedback in ``context.state``, so per-node state must
carry over exactly as in the Simulation Engine). Compared per strategy
(:func:`flwr_ext.inline.compare_runs`):

- the per-update CSV, every column except ``wall_time`` (wall clock), ``node_id`` (drawn at
  random per run by both backends) and ``msg_id`` (a random UUID per message);
- the bytes CSV and the result metrics (accuracy, loss, staleness... per version) except their
  ``wall-time``;
- the final model: the arrays of the last checkpoint (``checkpoint-every = 1``), compared with
  ``np.array_equal``.

``drain-timeout`` makes each strategy wait for its jobs still in flight before the next one
starts; without it, in the Simulation Engine a job left in flight and the next strategy's first
job to that node can run at the same time on two Ray workers from the same Context, and the
node's compression state depends on which finishes last (see ``docs/simulation.md``).
Cost: two Simulation Engine runs (~30-60 s each on 2 cores) and four inline runs (~5-20 s).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from flwr_ext.inline import compare_runs
from flwr_ext.sim import fused_run_config, load_components, run_app

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "async-vision"
STRATEGIES = ["fedasync", "fedbuff", "fedcompass", "fedavg-timed"]


def _run(out: Path, backend: str, compression: str, workers: int = 0) -> None:
    server_app, client_app = load_components(APP_DIR)
    cfg = fused_run_config(
        APP_DIR,
        {
            "strategy": ",".join(STRATEGIES),
            "output-dir": str(out / "out"),
            "checkpoint-dir": str(out / "ckpt"),
            "checkpoint-every": 1,
            "drain-timeout": 120.0,
            "compression": compression,
            "num-server-rounds": 6,
            "profile": "exponential",
            "profile-jitter": 0.1,
            "local-steps": 2,
            "buffer-size": 2,
            "compass-q-min": 2,
            "compass-q-max": 4,
            "min-train-nodes": 3,
            "seed": 1,
        },
    )
    try:
        run_app(
            server_app,
            client_app,
            num_supernodes=3,
            run_config=cfg,
            backend=backend,
            inline_workers=workers,
        )
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _final(run: Path, name: str) -> tuple[int, dict[str, np.ndarray]]:
    d = run / "ckpt" / name
    state = pickle.loads((d / (d / "latest").read_text().strip()).read_bytes())  # noqa: S301
    return int(state["version"]), state["params"]


@pytest.mark.parametrize("compression", ["none", "fedzip"])
def test_inline_equals_simulation_engine(tmp_path, compression):
    _run(tmp_path / "simulation", "simulation", compression)
    _run(tmp_path / "inline", "inline", compression)
    _run(tmp_path / "pool", "inline", compression, workers=2)  # 2 warm worker processes
    for run in ("inline", "pool"):
        for name in STRATEGIES:
            diffs = compare_runs(tmp_path / "simulation" / "out", tmp_path / run / "out", name)
            assert not diffs, (run, diffs)
            v_se, p_se = _final(tmp_path / "simulation", name)
            v_in, p_in = _final(tmp_path / run, name)
            assert v_se == v_in == 6, (run, name, v_se, v_in)
            assert p_se.keys() == p_in.keys()
            for k in p_se:
                same = p_se[k].dtype == p_in[k].dtype and np.array_equal(p_se[k], p_in[k])
                assert same, (run, name, k)
    if compression != "none":  # the replies really were compressed
        import csv

        with (tmp_path / "inline" / "out" / "fedbuff-bytes.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert all(int(r["bytes_up"]) < int(r["bytes_down"]) / 10 for r in rows)
