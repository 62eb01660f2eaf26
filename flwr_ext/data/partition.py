"""Partitioning helpers: thin, named wrappers over flwr-datasets partitioners."""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    PathologicalPartitioner,
)

PARTITIONERS = ("iid", "dirichlet", "pathological", "natural", "intertwined")


def slow_labels(num_classes: int, slow_classes: int) -> list[int]:
    """The labels only the slow nodes hold under ``intertwined``: the ``K`` highest ids."""
    if not 1 <= slow_classes < num_classes:
        raise ValueError(f"slow_classes must be in [1, {num_classes}), got {slow_classes}")
    return list(range(num_classes - slow_classes, num_classes))


class IntertwinedPartitioner(Partitioner):
    """The slow nodes hold the labels the fast ones lack (data correlated with device speed).

    The ``slow_classes`` labels with the highest ids (of those present in the dataset) are
    split, shuffled, into near-equal parts among partitions ``0 .. slow_nodes - 1``; every
    other example is spread IID over partitions ``slow_nodes .. num_partitions - 1``. Pair it
    with the ``intertwined`` device profile (:mod:`flwr_ext.asyncfl.profiles`), whose slow
    nodes are the same keys: the case the FedCompass and FedFix papers say breaks plain
    asynchronous weighting (fast clients dominate the model, the slow clients' labels fade).

    Parameters
    ----------
    num_partitions : int
        Number of clients (> ``slow_nodes``).
    slow_nodes : int
        Partitions ``0 .. slow_nodes - 1`` hold the slow labels (>= 1).
    slow_classes : int
        Number of slow labels (>= 1, fewer than the labels present).
    partition_by : str
        Column holding the label.
    seed : int
        Seed of the shuffles.
    """

    def __init__(
        self,
        num_partitions: int,
        slow_nodes: int = 2,
        slow_classes: int = 2,
        partition_by: str = "label",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 1 <= slow_nodes < num_partitions:
            raise ValueError(
                f"slow_nodes must be in [1, num_partitions={num_partitions}), got {slow_nodes}"
            )
        if slow_classes < 1:
            raise ValueError(f"slow_classes must be >= 1, got {slow_classes}")
        self._num_partitions = int(num_partitions)
        self.slow_nodes = int(slow_nodes)
        self.slow_classes = int(slow_classes)
        self.partition_by = partition_by
        self.seed = int(seed)
        self._indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        """Total number of partitions."""
        return self._num_partitions

    def _assign(self) -> list[np.ndarray]:
        labels = np.asarray(self.dataset[self.partition_by])
        present = np.unique(labels)
        if self.slow_classes >= len(present):
            raise ValueError(
                f"slow_classes={self.slow_classes} leaves no label for the fast nodes "
                f"({len(present)} labels present)"
            )
        slow = np.isin(labels, present[-self.slow_classes :])
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, 17]))
        slow_idx = rng.permutation(np.flatnonzero(slow))
        fast_idx = rng.permutation(np.flatnonzero(~slow))
        parts = np.array_split(slow_idx, self.slow_nodes)
        parts += np.array_split(fast_idx, self._num_partitions - self.slow_nodes)
        return [np.sort(p) for p in parts]

    def load_partition(self, partition_id: int) -> Dataset:
        """Partition ``partition_id`` (the assignment is computed once)."""
        if self._indices is None:
            self._indices = self._assign()
        return self.dataset.select(self._indices[partition_id].tolist())


def make_partitioner(
    name: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    partition_by: str = "label",
    min_partition_size: int = 10,
    classes_per_partition: int = 2,
    slow_nodes: int = 2,
    slow_classes: int = 2,
    seed: int = 0,
) -> Partitioner:
    """Build a flwr-datasets partitioner by name.

    Parameters
    ----------
    name : str
        ``"iid"`` (:class:`IidPartitioner`); ``"dirichlet"``
        (:class:`DirichletPartitioner`, label skew of Hsu et al. 2019: each class is
        spread over clients with proportions drawn from ``Dir(alpha)``);
        ``"pathological"`` (:class:`PathologicalPartitioner`: each client holds
        ``classes_per_partition`` classes, as in McMahan et al. 2017 and Shepherd);
        ``"natural"`` (:class:`NaturalIdPartitioner`: one client per value of
        ``partition_by``; ``num_partitions`` is then the number of values);
        ``"intertwined"`` (:class:`IntertwinedPartitioner`: the ``slow_classes`` highest
        labels only on partitions ``0 .. slow_nodes - 1``, the rest IID on the others).
    num_partitions : int
        Number of clients.
    alpha : float
        Dirichlet concentration; smaller is more skewed.
    partition_by : str
        Column holding the label.
    min_partition_size : int
        Dirichlet: redraw until every partition has at least this many examples.
    classes_per_partition : int
        Pathological: classes per client.
    slow_nodes, slow_classes : int
        Intertwined: slow partitions and the labels only they hold.
    seed : int
        Seed of the draw.
    """
    if name == "natural":
        return NaturalIdPartitioner(partition_by=partition_by)
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if name == "pathological":
        return PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by=partition_by,
            num_classes_per_partition=classes_per_partition,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if name == "intertwined":
        return IntertwinedPartitioner(
            num_partitions,
            slow_nodes=slow_nodes,
            slow_classes=slow_classes,
            partition_by=partition_by,
            seed=seed,
        )
    raise ValueError(f"Unknown partitioner {name!r}; choose one of {PARTITIONERS}")


def partition_dataset(
    dataset: Dataset | None, partitioner: Partitioner, partition_id: int
) -> Dataset:
    """Return partition ``partition_id`` of ``dataset``.

    ``dataset`` is assigned on the first call (it may be ``None`` afterwards). The
    partitioner object is reused across calls; flwr-datasets caches its
    assignment, so all partitions of one partitioner are disjoint.
    """
    if not partitioner.is_dataset_assigned():
        partitioner.dataset = dataset
    if not 0 <= partition_id < partitioner.num_partitions:
        raise ValueError(
            f"partition_id {partition_id} out of range [0, {partitioner.num_partitions})"
        )
    return partitioner.load_partition(partition_id)
