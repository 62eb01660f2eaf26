"""ClientApp: ``local-steps`` Adam steps on this node's shard; reports its training time.

``train-s`` (reply metric) is the wall time of the training loop alone (the local-training floor
the bench compares the backends' wall time per update with).
"""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from inline_mlp.task import make_model, partition

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model, reply with the new one."""
    torch.set_num_threads(1)
    cfg, sent = context.run_config, msg.content["config"]
    pid = int(context.node_config["partition-id"])
    x, y = partition(pid, int(context.node_config["num-partitions"]), int(cfg.get("seed", 0)))
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    steps = int(sent.get("local-steps", cfg.get("local-steps", 20)))
    batch = int(cfg.get("batch-size", 32))
    g = torch.Generator().manual_seed(
        int(cfg.get("seed", 0)) * 100_003 + pid * 1_009 + int(sent["server-round"])
    )
    t0 = time.perf_counter()
    opt = torch.optim.Adam(
        model.parameters(), lr=float(sent.get("lr", cfg.get("learning-rate", 1e-3)))
    )
    loss = torch.zeros(())
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    metrics = MetricRecord(
        {
            "num-examples": len(y),
            "num-steps": steps,
            "partition-id": pid,
            "train-loss": float(loss.detach()),
            "train-s": train_s,
        }
    )
    return Message(
        RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg
    )
