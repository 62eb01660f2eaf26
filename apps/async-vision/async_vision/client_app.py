"""ClientApp: a DigitsCNN trained on this node's partition.

It is a plain Flower ClientApp of the kind written for Flower's FedAvg: it reads
the global model from ``arrays`` and replies with ``arrays`` and a MetricRecord with
``num-examples``. It also honours ``local-steps`` when a strategy (FedCompass) sends it,
trains only task ``task-id``'s arrays of a FedAST model (:mod:`flwr_ext.strategies.fedast`),
and reports its ``partition-id`` (in a ConfigRecord ``identity``, kept out of the averaged
metrics) so the asynchronous engine can key device profiles by it.
The ``compression`` run-config key (``none``, ``fedzip``, ``dgc``, ``qsgd-8bit``) selects how
train replies are encoded: :func:`flwr_ext.compression.compression_mod` reads it per message.
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from async_vision.settings import validate
from flwr_ext.compression import compression_mod
from flwr_ext.data.images import load_partition, load_test_set, to_tensors
from flwr_ext.strategies.fedast import TASK_ID, merge_task, task_arrays
from flwr_ext.vision import DigitsCNN, evaluate, train_local

# preset read from context.run_config["compression"] on every message ("none": untouched)
app = ClientApp(mods=[compression_mod(None)])


def _setup(msg: Message, context: Context) -> tuple[DigitsCNN, torch.Tensor, torch.Tensor]:
    cfg = validate(context.run_config)
    torch.set_num_threads(int(cfg.get("torch-threads", 1)))
    model = DigitsCNN()
    arrays = msg.content["arrays"]
    if TASK_ID in msg.content["config"]:  # FedAST: train only this task's model
        arrays = ArrayRecord(task_arrays(arrays, int(msg.content["config"][TASK_ID])))
    model.load_state_dict(arrays.to_torch_state_dict())
    pid = int(context.node_config["partition-id"])
    num = int(context.node_config["num-partitions"])
    part = load_partition(
        str(cfg.get("dataset", "digits")),
        pid,
        num,
        partitioner=str(cfg.get("partitioner", "dirichlet")),
        alpha=float(cfg.get("dirichlet-alpha", 0.5)),
        seed=int(cfg.get("seed", 0)),
        slow_nodes=int(cfg.get("intertwined-slow-nodes", 2)),
        slow_classes=int(cfg.get("intertwined-slow-classes", 2)),
    )
    x, y = to_tensors(part)
    return model, x, y


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model locally and reply with the new weights.

    ``delay-s`` in the node config (``flower-supernode --node-config "delay-s=2.0"``) adds an
    artificial per-job delay, to emulate a slow device in a real deployment.
    """
    delay = float(context.node_config.get("delay-s", 0.0))
    if delay > 0:
        time.sleep(delay)
    model, x, y = _setup(msg, context)
    cfg = validate(context.run_config)
    pid = int(context.node_config["partition-id"])
    sent = msg.content["config"]
    server_round = int(sent.get("server-round", 0))
    loss, steps = train_local(
        model,
        x,
        y,
        epochs=int(cfg.get("local-epochs", 1)),
        steps=int(sent.get("local-steps", cfg.get("local-steps", 0))),
        batch_size=int(cfg.get("batch-size", 16)),
        lr=float(sent.get("lr", cfg.get("learning-rate", 0.05))),
        momentum=float(cfg.get("momentum", 0.0)),
        seed=int(cfg.get("seed", 0)) * 100_003 + server_round * 1_009 + pid,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(x),
            "train-loss": loss,
            "num-steps": steps,
        }
    )
    # lets the engine key this node stably (Flower draws node ids at random); a ConfigRecord,
    # so that Flower's FedAvg does not average it with the metrics
    identity = ConfigRecord({"partition-id": pid})
    arrays = ArrayRecord(model.state_dict())
    if TASK_ID in sent:  # FedAST: every task's arrays go back, the others unchanged
        arrays = merge_task(msg.content["arrays"], int(sent[TASK_ID]), arrays)
    content = {"arrays": arrays, "metrics": metrics, "identity": identity}
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's partition."""
    model, x, y = _setup(msg, context)
    loss, acc = evaluate(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-acc": acc})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def centralized_test_set(dataset: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out test set (used by the ServerApp's ``evaluate_fn``)."""
    return to_tensors(load_test_set(dataset, seed=seed))
