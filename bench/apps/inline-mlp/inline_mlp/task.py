"""Data (scikit-learn's digits, IID shards) and the MLP 64-64-10."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

NUM_TEST = 297  # the last 297 of 1,797 digits are the server's test set


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=64)
def partition(pid: int, num_partitions: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IID shard ``pid`` of the training digits (seeded shuffle), as tensors."""
    x, y = _digits()
    x, y = x[:-NUM_TEST], y[:-NUM_TEST]
    idx = np.array_split(np.random.default_rng(seed).permutation(len(y)), num_partitions)[pid]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """The server's held-out digits."""
    x, y = _digits()
    return torch.from_numpy(x[-NUM_TEST:]), torch.from_numpy(y[-NUM_TEST:])


def make_model() -> nn.Module:
    """MLP 64-64-10."""
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
