"""ServerApp: builds the strategy named in the run config and runs it.

Run-config keys are documented in this app's README and checked by
:func:`async_vision.settings.validate` before anything is sent; every strategy named in
``strategy`` is built (its constructor's checks run) before the first one starts. Results
(centralized accuracy per model update, per-update records as CSV, engine counters) are written
to ``output-dir`` when set.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from async_vision.client_app import centralized_test_set
from async_vision.settings import validate
from flwr_ext.asyncfl import AsyncResult, AsyncStrategy
from flwr_ext.compression import Compressed, get_preset
from flwr_ext.compression.accounting import write_update_bytes
from flwr_ext.compression.hints import explain_missing_decoder
from flwr_ext.data.partition import slow_labels
from flwr_ext.results import save_result
from flwr_ext.strategies import build_strategy
from flwr_ext.strategies.factory import build_start_kwargs
from flwr_ext.vision import DigitsCNN, evaluate

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Build the strategy from the run config, start it, save the result."""
    cfg = validate(context.run_config)
    # ``strategy`` may list several (comma-separated): they run one after the other on the
    # same SuperNodes, each from the same initial model and a fresh clock (used by the demo).
    # All are built first, so a bad setting of the last one fails before the first one runs.
    names = str(cfg.get("strategy", "fedavg")).split(",")
    runs = [_build({**cfg, "strategy": name}) for name in names]
    torch.set_num_threads(int(cfg.get("torch-threads", 1)))
    torch.manual_seed(int(cfg.get("seed", 0)))
    x_test, y_test = centralized_test_set(
        str(cfg.get("dataset", "digits")), int(cfg.get("seed", 0))
    )

    # intertwined partition: also the accuracy on the labels only the slow nodes hold
    slow = None
    if str(cfg.get("partitioner", "dirichlet")) == "intertwined":
        labels = slow_labels(10, int(cfg.get("intertwined-slow-classes", 2)))
        slow = torch.isin(y_test, torch.tensor(labels))

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = DigitsCNN()
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, x_test, y_test)
        metrics = MetricRecord({"loss": loss, "accuracy": acc})
        if slow is not None:
            metrics["accuracy-slow-classes"] = evaluate(model, x_test[slow], y_test[slow])[1]
        return metrics

    for run_cfg, strategy, start_kwargs in runs:
        torch.manual_seed(int(cfg.get("seed", 0)))
        result = _run_strategy(grid, run_cfg, strategy, start_kwargs, evaluate_fn)
        if cfg.get("output-dir"):
            out = Path(str(cfg["output-dir"]))
            _save(result, out, run_cfg["strategy"])
            if hasattr(strategy, "conversions"):  # StaleConversion: one row per conversion
                _save_rows(strategy.conversions, out / f"{run_cfg['strategy']}-conversions.csv")


def _build(cfg: dict) -> tuple[dict, object, dict]:
    """The strategy of ``cfg["strategy"]`` and its ``start`` keywords (constructors' checks)."""
    try:
        strategy = build_strategy(cfg)
        start_kwargs = build_start_kwargs(cfg)
    except ValueError as exc:
        raise ValueError(f"run config of strategy {cfg['strategy']!r}: {exc}") from None
    compression = str(cfg.get("compression", "none") or "none")
    get_preset(compression)  # checked by validate; kept for callers that skip it
    down = str(cfg.get("compression-down", "none") or "none")
    if down != "none" and isinstance(strategy, AsyncStrategy):
        # the engine keeps one EF21-P shadow per node and sends each job C(x_v - w_i)
        start_kwargs = {**start_kwargs, "downlink": down}
    if (compression != "none" or down != "none") and not isinstance(strategy, AsyncStrategy):
        # a Flower strategy: decode replies before it aggregates (and, with compression-down,
        # send each node C(x - w_i) against its shadow). Async strategies decode in the engine
        # (flwr_ext.asyncfl.validate) against the model version each node was sent.
        out = str(cfg.get("output-dir", ""))
        csv = Path(out) / f"{cfg['strategy']}-bytes.csv" if out else None
        strategy = Compressed(strategy, csv_path=csv, downlink=down)
    return cfg, strategy, start_kwargs


def _run_strategy(grid: Grid, cfg: dict, strategy, start_kwargs: dict, evaluate_fn) -> object:
    train_config = ConfigRecord({"lr": float(cfg.get("learning-rate", 0.05))})
    if int(cfg.get("local-steps", 0)) > 0:
        train_config["local-steps"] = int(cfg["local-steps"])
    with explain_missing_decoder():  # a Flower strategy meeting compressed replies says why
        return strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(DigitsCNN().state_dict()),
            num_rounds=int(cfg.get("num-server-rounds", 5)),
            timeout=float(cfg.get("timeout", 3600)),
            train_config=train_config,
            evaluate_fn=evaluate_fn,
            **start_kwargs,
        )


def _save(result, out: Path, name: str) -> None:
    save_result(result, out, name=name)
    if isinstance(result, AsyncResult):
        result.write_csv(out / f"{name}-updates.csv")
        write_update_bytes(result.updates, out / f"{name}-bytes.csv")
        info = {
            "counters": result.counters,
            "reasons": result.reasons,
            "stop_reason": result.stop_reason,
        }
        (out / f"{name}-counters.json").write_text(json.dumps(info, indent=1))


def _save_rows(rows: list[dict], path: Path) -> None:
    fields = ["version", "node", "staleness", "residual", "accepted", "seconds"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else fields)
        writer.writeheader()
        writer.writerows(rows)
