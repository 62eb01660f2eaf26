"""FedAvgTimed samples ``max(fraction_train * N, min_train_nodes)`` nodes per round (public API)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.strategies import FedAvgTimed

from .helpers import init_arrays, shift_client


def _cohorts(res) -> dict[int, list[int]]:
    """Partition ids applied in each model version."""
    out: dict[int, list[int]] = defaultdict(list)
    for r in res.updates:
        if r.applied_in >= 0:
            out[r.applied_in].append(r.node)
    return dict(out)


@pytest.mark.parametrize(
    ("fraction", "minimum", "expected"),
    [(0.5, 2, 5), (0.1, 3, 3), (0.25, 1, 2), (1.0, 2, 10)],
)
def test_round_size_is_max_of_fraction_and_minimum(fraction, minimum, expected):
    prof = DeviceProfile("exponential", mean_step_time=0.1, jitter=0.2)
    res = FedAvgTimed(fraction_train=fraction, min_train_nodes=minimum, seed=3).start(
        FakeGrid(shift_client, 10, seed=1),
        init_arrays(),
        num_rounds=3,
        clock=VirtualClock(prof, seed=2),
        poll_interval=0,
    )
    cohorts = _cohorts(res)
    assert sorted(cohorts) == [1, 2, 3]
    for nodes in cohorts.values():
        assert len(nodes) == len(set(nodes)) == expected
    # the barrier: nobody trains on a stale model
    assert all(r.staleness == 0 for r in res.updates if r.applied_in >= 0)
    # x_t = x_{t-1} + sum_i n_i (i + 1) / sum_i n_i with n_i = 10 (i + 1) (shift_client)
    x = 0.0
    for v in (1, 2, 3):
        n = np.array(cohorts[v]) + 1.0
        x += float((n * 10 * n).sum() / (10 * n).sum())
    np.testing.assert_allclose(res.arrays["w"].numpy(), np.full((3, 4), x), rtol=1e-5)


def test_sampling_is_seeded_and_varies_by_round():
    def run(seed):
        return _cohorts(
            FedAvgTimed(fraction_train=0.3, min_train_nodes=2, seed=seed).start(
                FakeGrid(shift_client, 10, seed=4),
                init_arrays(),
                num_rounds=4,
                clock=VirtualClock(DeviceProfile("homogeneous", mean_step_time=0.1), seed=0),
                poll_interval=0,
            )
        )

    a, b = run(0), run(0)
    assert {v: sorted(n) for v, n in a.items()} == {v: sorted(n) for v, n in b.items()}
    assert len({tuple(sorted(n)) for n in a.values()}) > 1  # not the same 3 nodes every round
    assert run(1) != a
