"""The reply gate: its finiteness check, and the count bound read off a sorted window."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.asyncfl.intake import Intake, is_finite


@pytest.mark.parametrize(
    ("values", "dtype", "finite"),
    [
        ([1.0, 2.0], np.float32, True),
        ([1.0, np.nan], np.float32, False),
        ([np.inf, -np.inf], np.float32, False),  # the sum is NaN
        ([3e38, 3e38], np.float32, True),  # finite values whose sum overflows
        ([3e38, np.inf], np.float32, False),
        ([6e4, 6e4], np.float16, True),
        ([1 + 1j, complex(np.inf, 0)], np.complex128, False),
        ([[1.0, 2.0], [3.0, np.nan]], np.float64, False),
        ([1, 2], np.int64, True),
    ],
)
def test_is_finite_matches_isfinite_all(values, dtype, finite):
    arr = np.array(values, dtype=dtype)
    assert is_finite(arr) is finite
    assert finite == bool(np.isfinite(arr).all())


def test_count_bound_uses_the_median_of_the_recent_counts():
    rng = np.random.default_rng(0)
    for trial in range(6):
        intake = Intake(None, count_ratio=3.0)
        counts = rng.lognormal(3, 1, 1500) if trial % 2 else rng.integers(1, 9, 1500) * 1.0
        counts[::97] = 1e9
        for n in counts:
            want = float(n)
            if len(intake.recent_counts) >= 3:
                want = min(want, 3.0 * float(np.median(intake.recent_counts)))
            assert intake.bound_count(float(n)) == want
        assert sorted(intake.recent_counts) == intake._sorted_counts  # noqa: SLF001
