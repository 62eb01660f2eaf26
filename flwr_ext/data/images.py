"""Image classification data for the vision app: the embedded digits or a hub dataset.

``"digits"`` (default) is scikit-learn's embedded 8x8 digits, split once into a
federated train part and a held-out test set. Any other name is treated as a
flwr-datasets / Hugging Face dataset id or a local dataset directory (for
example ``ylecun/mnist``), loaded through :class:`flwr_datasets.FederatedDataset`
with the same partitioner, for users whose machines reach a hub.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from datasets import Dataset

from flwr_ext.data.digits import load_digits_dataset, train_test_split_dataset
from flwr_ext.data.partition import make_partitioner, partition_dataset

EMBEDDED = "digits"


@lru_cache(maxsize=4)
def _embedded_split(seed: int) -> tuple[Dataset, Dataset]:
    return train_test_split_dataset(load_digits_dataset(), test_fraction=0.2, seed=seed)


@lru_cache(maxsize=8)
def _federated_dataset(
    name: str,
    partitioner_name: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    slow: tuple[int, int] = (2, 2),
):
    from flwr_datasets import FederatedDataset

    partitioner = make_partitioner(
        partitioner_name,
        num_partitions,
        alpha=alpha,
        seed=seed,
        slow_nodes=slow[0],
        slow_classes=slow[1],
    )
    return FederatedDataset(
        dataset=name, partitioners={"train": partitioner}, shuffle=True, seed=seed
    )


@lru_cache(maxsize=8)
def _embedded_partitioner(
    partitioner_name: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    slow: tuple[int, int] = (2, 2),
):
    return make_partitioner(
        partitioner_name,
        num_partitions,
        alpha=alpha,
        seed=seed,
        slow_nodes=slow[0],
        slow_classes=slow[1],
    )


def load_partition(
    name: str,
    partition_id: int,
    num_partitions: int,
    *,
    partitioner: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    slow_nodes: int = 2,
    slow_classes: int = 2,
) -> Dataset:
    """Load one client's training partition.

    Parameters
    ----------
    name : str
        ``"digits"`` or a dataset id / local dataset path for flwr-datasets.
    partition_id, num_partitions : int
        Which of how many partitions.
    partitioner : str
        A name of :data:`flwr_ext.data.partition.PARTITIONERS` (see
        :func:`flwr_ext.data.make_partitioner`).
    alpha : float
        Dirichlet concentration.
    seed : int
        Seed of the split and of the partitioning.
    slow_nodes, slow_classes : int
        ``"intertwined"``: slow partitions and the labels only they hold.
    """
    slow = (int(slow_nodes), int(slow_classes))
    if name == EMBEDDED:
        train, _ = _embedded_split(seed)
        part = _embedded_partitioner(partitioner, num_partitions, alpha, seed, slow)
        return partition_dataset(train, part, partition_id)
    fds = _federated_dataset(name, partitioner, num_partitions, alpha, seed, slow)
    return fds.load_partition(partition_id, "train")


def load_test_set(name: str, seed: int = 0) -> Dataset:
    """Load the centralized held-out test set (``test`` split for hub datasets)."""
    if name == EMBEDDED:
        return _embedded_split(seed)[1]
    from datasets import load_dataset

    return load_dataset(name, split="test")


def to_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert a partition to ``(images [N, 1, H, W] float32, labels [N] int64)``.

    Accepts the embedded layout (64 floats per row) and hub layouts (PIL images in an
    ``image`` or ``img`` column, pixel values 0-255).
    """
    img_col = "image" if "image" in dataset.column_names else "img"
    label_col = "label" if "label" in dataset.column_names else dataset.column_names[-1]
    raw = dataset[img_col]
    if len(raw) and hasattr(raw[0], "convert"):  # PIL images from a hub dataset
        arr = np.stack([np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in raw])
    else:
        arr = np.asarray(raw, dtype=np.float32)
        side = int(round(np.sqrt(arr.shape[1]))) if arr.ndim == 2 else arr.shape[-1]
        arr = arr.reshape(len(arr), side, side)
    x = torch.from_numpy(arr).unsqueeze(1)
    y = torch.as_tensor(np.asarray(dataset[label_col], dtype=np.int64))
    return x, y
