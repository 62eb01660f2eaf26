"""Partitioning of the embedded digits with flwr-datasets partitioners."""

import numpy as np
import pytest

from flwr_ext.data import (
    load_digits_dataset,
    make_partitioner,
    partition_dataset,
    train_test_split_dataset,
)


@pytest.fixture(scope="module")
def split():
    # an ``idx`` column (row of the full dataset) lets the tests check disjointness
    ds = load_digits_dataset()
    ds = ds.add_column("idx", list(range(len(ds))))
    return train_test_split_dataset(ds, test_fraction=0.2, seed=0)


def _indices(partitions) -> list[list[int]]:
    return [list(p["idx"]) for p in partitions]


def _assert_disjoint_cover(parts: list[list[int]], universe: list[int]) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "partitions overlap"
    assert sorted(flat) == sorted(universe), "partitions do not cover the set exactly"


def test_digits_are_the_real_sklearn_images():
    ds = load_digits_dataset()
    assert len(ds) == 1797
    assert sorted(set(ds["label"])) == list(range(10))
    img = np.asarray(ds[0]["image"])
    assert img.shape == (64,) and img.min() >= 0.0 and img.max() <= 1.0


def test_test_split_is_stratified_and_disjoint(split):
    train, test = split
    assert len(train) + len(test) == 1797
    counts = np.bincount(test["label"], minlength=10)
    full = np.bincount(load_digits_dataset()["label"], minlength=10)
    assert np.all(np.abs(counts - 0.2 * full) <= 1)
    # disjoint and together the whole dataset: no test image is trained on
    _assert_disjoint_cover([list(train["idx"]), list(test["idx"])], list(range(1797)))


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_partitions_cover_train_set_exactly_once(split, name):
    train, _ = split
    part = make_partitioner(name, 10, alpha=0.5, seed=1)
    parts = [partition_dataset(train, part, i) for i in range(10)]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(train)
    assert min(sizes) >= 10
    _assert_disjoint_cover(_indices(parts), list(train["idx"]))


def test_pathological_partitions_hold_their_classes_only(split):
    train, _ = split
    part = make_partitioner("pathological", 10, classes_per_partition=2, seed=0)
    parts = [partition_dataset(train, part, i) for i in range(10)]
    for p in parts:
        assert len(set(p["label"])) == 2
    _assert_disjoint_cover(_indices(parts), list(train["idx"]))
    # "first-deterministic": partition i always holds class i (the second class is drawn)
    assert all(i in set(p["label"]) for i, p in enumerate(parts))
    one = make_partitioner("pathological", 5, classes_per_partition=1, seed=0)
    labels = [set(partition_dataset(train, one, i)["label"]) for i in range(5)]
    assert all(len(s) == 1 for s in labels)


def test_iid_partitions_are_balanced(split):
    train, _ = split
    part = make_partitioner("iid", 4)
    sizes = [len(partition_dataset(train, part, i)) for i in range(4)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skews_labels_more_as_alpha_falls(split):
    train, _ = split

    def mean_label_entropy(alpha: float) -> float:
        part = make_partitioner("dirichlet", 10, alpha=alpha, seed=3)
        ents = []
        for i in range(10):
            p = np.bincount(partition_dataset(train, part, i)["label"], minlength=10)
            p = p[p > 0] / p.sum()
            ents.append(float(-(p * np.log(p)).sum()))
        return float(np.mean(ents))

    assert mean_label_entropy(0.1) < mean_label_entropy(1.0) < mean_label_entropy(100.0)


def test_dirichlet_is_seeded(split):
    train, _ = split
    a = partition_dataset(train, make_partitioner("dirichlet", 5, seed=7), 2)["label"]
    b = partition_dataset(train, make_partitioner("dirichlet", 5, seed=7), 2)["label"]
    assert a == b
    others = [
        partition_dataset(train, make_partitioner("dirichlet", 5, seed=s), 2)["label"]
        for s in (8, 9)
    ]
    assert all(o != a for o in others)


def test_bad_arguments_raise_clear_errors(split):
    train, _ = split
    with pytest.raises(ValueError, match="Unknown partitioner"):
        make_partitioner("pathological-typo", 4)
    with pytest.raises(ValueError, match="num_partitions"):
        make_partitioner("iid", 0)
    with pytest.raises(ValueError, match="out of range"):
        partition_dataset(train, make_partitioner("iid", 4), 4)
