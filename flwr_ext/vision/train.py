"""Local SGD training and evaluation on in-memory tensors."""

from __future__ import annotations

import math

import torch
from torch import nn


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 1,
    steps: int = 0,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    seed: int = 0,
    grad_offset: dict[str, torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Run mini-batch SGD on ``(x, y)``.

    Parameters
    ----------
    model : nn.Module
        Model trained in place.
    x, y : torch.Tensor
        Inputs and integer labels.
    epochs : int
        Passes over the data, used when ``steps`` is 0.
    steps : int
        If positive, run exactly this many mini-batch steps (cycling through the
        data). This is how FedCompass assigns work (``local-steps``).
    batch_size : int
        Mini-batch size.
    lr, momentum : float
        SGD hyper-parameters.
    seed : int
        Seed of the shuffling.
    grad_offset : dict[str, torch.Tensor], optional
        Added to the gradient of the parameter of that name before every step: SCAFFOLD's
        drift correction ``c - c_i`` (the ``"scafcom-correction"`` record of
        :func:`flwr_ext.compression.scafcom.scafcom_mod`).

    Returns
    -------
    tuple[float, int]
        Mean training loss and the number of steps run.
    """
    n = len(x)
    if n == 0:
        raise ValueError("cannot train on an empty partition")
    batches_per_epoch = math.ceil(n / batch_size)
    total = steps if steps > 0 else epochs * batches_per_epoch
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    offsets = [
        (name, p)
        for name, p in model.named_parameters()
        if grad_offset and name in grad_offset and p.requires_grad  # frozen: no gradient
    ]
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    loss_sum, done = 0.0, 0
    while done < total:
        perm = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if done >= total:
                break
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            for name, p in offsets:
                p.grad.add_(grad_offset[name])  # type: ignore[index,union-attr]
            opt.step()
            loss_sum += loss.item()
            done += 1
    return loss_sum / total, total


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512
) -> tuple[float, float]:
    """Return ``(mean loss, accuracy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        loss += float(loss_fn(out, y[start : start + batch_size]))
        correct += int((out.argmax(1) == y[start : start + batch_size]).sum())
    return loss / max(len(x), 1), correct / max(len(x), 1)
