"""The intertwined heterogeneity: slow nodes hold the labels the fast ones lack."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.data.digits import load_digits_dataset, train_test_split_dataset
from flwr_ext.data.images import load_partition
from flwr_ext.data.partition import (
    IntertwinedPartitioner,
    make_partitioner,
    partition_dataset,
    slow_labels,
)
from flwr_ext.settings import ASYNC_ENGINE, SettingError, validate
from flwr_ext.strategies.factory import build_profile


@pytest.fixture(scope="module")
def train():
    return train_test_split_dataset(load_digits_dataset(), test_fraction=0.2, seed=0)[0]


def test_slow_labels():
    assert slow_labels(10, 2) == [8, 9]
    assert slow_labels(10, 3) == [7, 8, 9]
    with pytest.raises(ValueError):
        slow_labels(10, 10)
    with pytest.raises(ValueError):
        slow_labels(10, 0)


def test_slow_partitions_hold_exactly_the_slow_labels(train):
    part = make_partitioner("intertwined", 5, slow_nodes=2, slow_classes=2, seed=0)
    assert isinstance(part, IntertwinedPartitioner)
    parts = [partition_dataset(train if i == 0 else None, part, i) for i in range(5)]
    labels = [set(p["label"]) for p in parts]
    assert labels[0] == labels[1] == {8, 9}
    for i in (2, 3, 4):
        assert labels[i] == set(range(8))  # IID over the fast nodes: every other label
    all_labels = np.asarray(train["label"])
    n_slow = int(np.isin(all_labels, [8, 9]).sum())
    assert [len(p) for p in parts[:2]] == [n_slow - n_slow // 2, n_slow // 2]
    fast = [len(p) for p in parts[2:]]
    assert sum(fast) == len(train) - n_slow and max(fast) - min(fast) <= 1
    # disjoint and complete: every example once
    rows = [tuple(r) for p in parts for r in p["image"]]
    assert len(rows) == len(train)


def test_partitioner_validation_and_seed(train):
    with pytest.raises(ValueError):
        make_partitioner("intertwined", 3, slow_nodes=3)
    with pytest.raises(ValueError):
        make_partitioner("intertwined", 3, slow_nodes=0)
    a = make_partitioner("intertwined", 4, slow_nodes=1, slow_classes=3, seed=1)
    b = make_partitioner("intertwined", 4, slow_nodes=1, slow_classes=3, seed=1)
    pa, pb = partition_dataset(train, a, 2), partition_dataset(train, b, 2)
    assert pa["label"] == pb["label"] and set(partition_dataset(None, a, 0)["label"]) == {7, 8, 9}
    too_many = make_partitioner("intertwined", 4, slow_nodes=1, slow_classes=10)
    with pytest.raises(ValueError, match="no label for the fast nodes"):
        partition_dataset(train, too_many, 0)


def test_load_partition_passes_the_slow_keys():
    p0 = load_partition("digits", 0, 4, partitioner="intertwined", slow_nodes=1, slow_classes=3)
    p3 = load_partition("digits", 3, 4, partitioner="intertwined", slow_nodes=1, slow_classes=3)
    assert set(p0["label"]) == {7, 8, 9}
    assert set(p3["label"]) == set(range(7))


def test_slow_nodes_step_times():
    prof = DeviceProfile("intertwined", mean_step_time=0.1, slow_nodes=2, slow_factor=10.0)
    assert [prof.node(0, k).step_time for k in range(4)] == [1.0, 1.0, 0.1, 0.1]
    assert prof.node(5, 0).step_time == 1.0  # no draw: the seed does not matter
    jit = DeviceProfile("intertwined", mean_step_time=0.1, jitter=0.2, slow_nodes=1)
    for key, base in ((0, 1.0), (1, 0.1)):
        f = jit.jitter_factor(0, key, 3)
        assert 0.8 <= f <= 1.2 and jit.node(0, key).step_time == pytest.approx(base)
    assert VirtualClock(prof, seed=0) is not None
    with pytest.raises(ValueError):
        DeviceProfile("intertwined", slow_factor=0.0)
    with pytest.raises(ValueError):
        DeviceProfile("intertwined", slow_nodes=-1)


def test_run_config_keys():
    cfg = {"profile": "intertwined", "intertwined-slow-nodes": 3, "intertwined-slow-factor": 4}
    cfg = validate({**cfg, "intertwined-slow-classes": 2}, ASYNC_ENGINE)
    prof = build_profile(cfg)
    assert (prof.kind, prof.slow_nodes, prof.slow_factor) == ("intertwined", 3, 4.0)
    assert prof.node(0, 2).step_time == pytest.approx(0.4)
    assert prof.node(0, 3).step_time == pytest.approx(0.1)
    with pytest.raises(SettingError, match="intertwined-slow-factor"):
        validate({"intertwined-slow-factor": 0}, ASYNC_ENGINE)
    with pytest.raises(SettingError, match="intertwined-slow-nodes"):
        validate({"intertwined-slow-nodes": 0}, ASYNC_ENGINE)
