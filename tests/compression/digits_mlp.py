"""A one-hidden-layer numpy MLP on scikit-learn's digits, shared by the compression tests that
run Flower's Simulation Engine (no torch: each ClientApp call stays fast)."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from sklearn.datasets import load_digits

HIDDEN = 32


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train inputs, train labels, test inputs, test labels (1,400 / 397 images, fixed order)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def init_mlp() -> dict[str, np.ndarray]:
    """The initial model (seeded)."""
    rng = np.random.default_rng(42)
    return {
        "w1": (rng.standard_normal((64, HIDDEN)) * 0.1).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": (rng.standard_normal((HIDDEN, 10)) * 0.1).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }


def forward(p: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations and class probabilities."""
    h = np.maximum(x @ p["w1"] + p["b1"], 0)
    z = h @ p["w2"] + p["b2"]
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return h, e / e.sum(axis=1, keepdims=True)


def sgd_epochs(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, epochs: int = 2) -> None:
    """``epochs`` of mini-batch SGD (batch ~32, lr 0.5, fixed shuffles), in place."""
    rng = np.random.default_rng(0)
    for _ in range(epochs):
        for b in np.array_split(rng.permutation(len(y)), max(1, len(y) // 32)):
            h, prob = forward(p, x[b])
            g = prob
            g[np.arange(len(b)), y[b]] -= 1
            g /= len(b)
            dh = (g @ p["w2"].T) * (h > 0)
            for k, v in (("w2", h.T @ g), ("b2", g.sum(0)), ("w1", x[b].T @ dh), ("b1", dh.sum(0))):
                p[k] -= 0.5 * v.astype(np.float32)


def central_accuracy(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Flower's ``evaluate_fn``: accuracy of the received model on the test split."""
    _, _, xte, yte = digits_split()
    p = {k: v.numpy() for k, v in arrays.items()}
    return MetricRecord({"accuracy": float(np.mean(forward(p, xte)[1].argmax(1) == yte))})


def train_reply(msg: Message, context: Context, nodes: int, epochs: int = 2) -> Message:
    """A plain ClientApp written for Flower's FedAvg: train what it receives on its shard."""
    xtr, ytr, _, _ = digits_split()
    pid = int(context.node_config["partition-id"])
    x, y = xtr[pid::nodes], ytr[pid::nodes]
    p = {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}
    sgd_epochs(p, x, y, epochs)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in p.items()}),
            "metrics": MetricRecord({"num-examples": len(y)}),
        }
    )
    return Message(content, reply_to=msg)
