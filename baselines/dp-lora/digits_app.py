"""Baseline-local Flower apps for the digits DP-SGD sweep (library code only).

The ClientApp trains ``DigitsCNN`` (``width``, ``hidden``; ``activation`` "tanh" swaps its
ReLUs through :func:`flwr_ext.privacy.replace_activations`) on its IID partition of
scikit-learn's digits with :class:`flwr_ext.privacy.DPLoRAEngine` (``adapter_only=False``:
the whole CNN is trainable, 9,802 parameters with run_digits.py's defaults; there is no
adapter on it), the accountant restored from ``context.state`` each round.
The ServerApp runs Flower's ``FedAvg`` and evaluates the global model on the test split after
the last round, writing a JSON row to ``output``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader, TensorDataset

from flwr_ext.data.images import load_partition, load_test_set, to_tensors
from flwr_ext.privacy import DPConfig, DPLoRAEngine, replace_activations
from flwr_ext.vision.model import DigitsCNN
from flwr_ext.vision.train import evaluate

client_app = ClientApp()


def make_model(cfg: dict) -> DigitsCNN:
    """``DigitsCNN`` with the run config's ``width``, ``hidden`` and ``activation``."""
    model = DigitsCNN(width=int(cfg.get("width", 32)), hidden=int(cfg.get("hidden", 64)))
    replace_activations(model, str(cfg.get("activation", "relu")))
    return model


def local_steps(  # noqa: PLR0913
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    context: Context,
    dp: DPConfig | None,
    *,
    lr: float,
    batch: int,
    steps: int,
    rounds: int,
    round_seed: int,
    momentum: float = 0.0,
) -> dict[str, float]:
    """``steps`` SGD steps of batch ``batch``, or DP-SGD steps of expected batch ``batch``.

    Without DP, shuffled mini-batches drawn with ``round_seed``. With DP,
    :class:`flwr_ext.privacy.DPLoRAEngine` (Poisson sampling, per-sample clipping, noise
    calibrated once for ``rounds`` rounds) with its accountant restored from and saved to
    ``context.state``; returns its metrics (epsilon spent, noise multiplier).
    """
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    if dp is None:
        gen = torch.Generator().manual_seed(round_seed)
        done = 0
        while done < steps:
            loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=gen)
            for xb, yb in loader:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
        return {}
    engine = DPLoRAEngine.from_context(context, dp)
    dp_model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=batch),
        steps_per_round=steps,
        expected_rounds=rounds,
        adapter_only=False,
    )
    for xb, yb in engine.batches(loader, opt):
        opt.zero_grad()
        loss_fn(dp_model(xb), yb).backward()
        opt.step()
    engine.save(context)
    dp_model._close()
    return engine.metrics()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """``steps`` (DP-)SGD steps of expected batch ``batch`` on this node's partition."""
    torch.set_num_threads(1)
    cfg = context.run_config
    pid = int(context.node_config["partition-id"])
    x, y = to_tensors(
        load_partition("digits", pid, int(cfg["clients"]), partitioner="iid", seed=int(cfg["seed"]))
    )
    model = make_model(cfg)  # on its device (CPU) before make_private
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics: dict[str, float] = {"num-examples": len(x)}
    metrics |= local_steps(
        model,
        x,
        y,
        context,
        DPConfig.from_run_config(cfg),
        lr=float(cfg["lr"]),
        batch=int(cfg["batch"]),
        steps=int(cfg["steps"]),
        rounds=int(cfg["num-server-rounds"]),
        round_seed=int(msg.content["config"]["server-round"]) * 100 + pid,
    )
    content = RecordDict(
        {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content=content, reply_to=msg)


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over all clients; test accuracy of the final global model to ``output``."""
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    n = int(cfg["clients"])
    strategy = FedAvg(
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n
    )
    xt, yt = to_tensors(load_test_set("digits", seed=int(cfg["seed"])))
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(make_model(cfg).state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
    )
    model = make_model(cfg)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    _, acc = evaluate(model, xt, yt)
    last = result.train_metrics_clientapp[max(result.train_metrics_clientapp)]
    row = {"accuracy": acc, **{k: v for k, v in last.items() if k.startswith("dp-")}}
    Path(str(cfg["output"])).write_text(json.dumps(row))
