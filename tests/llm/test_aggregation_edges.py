"""Edges of the LoRA aggregation maths that ``make mutate`` showed untested (docs/testing.md):
one client, fractional and invalid weights, mismatched lengths (silent truncation), dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from flwr_ext.llm.aggregation import (
    append_to_stack,
    average_of_deltas,
    fedavg_states,
    ffa_aggregate,
    lora_deltas,
    lora_modules,
    stack_lora,
    stack_rank,
    stacked_rank,
)

M = "base_model.model.layers.0.q_proj"
A, B = f"{M}.lora_A.weight", f"{M}.lora_B.weight"


def _client(rng, r, dtype=np.float32):
    return {A: rng.normal(size=(r, 6)).astype(dtype), B: rng.normal(size=(5, r)).astype(dtype)}


def test_one_client_and_fractional_weights():
    rng = np.random.default_rng(0)
    s = _client(rng, 2)
    out = fedavg_states([s], [0.5])
    for k in s:
        np.testing.assert_array_equal(out[k], s[k])
        assert out[k].dtype == np.float32
    t = _client(rng, 2)
    mix = fedavg_states([s, t], [0.25, 0.75])
    np.testing.assert_allclose(mix[A], 0.25 * s[A] + 0.75 * t[A], rtol=1e-6)
    np.testing.assert_allclose(
        average_of_deltas([s], [0.3], [2.0])[M], 2.0 * s[B].astype(np.float64) @ s[A], rtol=1e-6
    )
    A1, B1 = stack_lora([s], [0.3], [2.0])[M]
    np.testing.assert_allclose(B1 @ A1, 2.0 * s[B] @ s[A], rtol=1e-5)
    # a zero weight is allowed as long as the sum is positive
    np.testing.assert_allclose(fedavg_states([s, t], [0.0, 2.0])[A], t[A])


@pytest.mark.parametrize(
    ("n", "weights"), [(2, [1.0, -0.5]), (2, [0.0, 0.0]), (0, []), (1, [[1.0]])]
)
def test_invalid_weights_raise(n, weights):
    rng = np.random.default_rng(1)
    states = [_client(rng, 2) for _ in range(n)]
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        fedavg_states(states, weights)


def test_mismatched_lengths_raise_instead_of_truncating():
    rng = np.random.default_rng(2)
    states = [_client(rng, 2), _client(rng, 4)]
    with pytest.raises(ValueError, match="one weight per state"):
        fedavg_states(states, [1.0])
    with pytest.raises(ValueError):
        stack_lora(states, [1.0, 1.0], [2.0])  # a missing scaling would drop a client
    with pytest.raises(ValueError):
        average_of_deltas(states, [1.0, 1.0], [2.0])
    with pytest.raises(ValueError):
        average_of_deltas(states, [1.0, 1.0, 1.0], [2.0, 2.0])
    with pytest.raises(ValueError, match="same keys"):
        fedavg_states([states[0], {A: states[0][A]}], [1.0, 1.0])
    with pytest.raises(ValueError, match="lora_B only"):
        ffa_aggregate([states[0]], [1.0], {A: states[0][A]})


def test_dtypes_on_the_wire_and_float64_accumulation():
    rng = np.random.default_rng(3)
    s64 = _client(rng, 2, np.float64)
    s32 = {k: v.astype(np.float32) for k, v in s64.items()}
    A1, B1 = stack_lora([s64, s64], [1.0, 1.0], [1.0, 1.0])[M]
    assert A1.dtype == np.float32 and B1.dtype == np.float32  # the wire format
    d = lora_deltas(s32, 1.0)[M]
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, s64[B] @ s64[A], rtol=1e-6)
    # fp16 states averaged in float64 (no fp16 rounding of the partial sums), returned as fp16
    h = [{A: np.full((1, 1), 1000.0 + i, np.float16)} for i in range(3)]
    out = fedavg_states(h, [1.0, 1.0, 1.0])[A]
    assert out.dtype == np.float16 and float(out[0, 0]) == 1001.0
    tiny = [{A: np.array([2049.0], np.float16)}, {A: np.array([2051.0], np.float16)}]
    assert float(fedavg_states(tiny, [1.0, 1.0])[A][0]) == 2050.0


def test_lora_modules_pairs_only_complete_adapters_and_stack_rank():
    state = {A: np.zeros((2, 6)), B: np.zeros((5, 2)), "other.lora_A.weight": np.zeros((1, 1))}
    assert lora_modules(state) == {M: (A, B)}
    stacked = {M: (np.zeros((6, 3)), np.zeros((4, 6))), "m2": (np.zeros((6, 2)), np.zeros((1, 6)))}
    assert stacked_rank(stacked) == 6
    with pytest.raises(ValueError, match="inconsistent"):
        stacked_rank({M: (np.zeros((6, 3)), None), "m2": (np.zeros((5, 3)), None)})
    empty = {f"{M}.flora_A": np.zeros((0, 6), np.float32), f"{M}.flora_B": np.zeros((5, 0))}
    assert stack_rank(empty) == 0 and stack_rank({}) == 0
    new = append_to_stack(empty, stack_lora([_client(np.random.default_rng(4), 3)], [1], [1]))
    assert stack_rank(new) == 3
    with pytest.raises(ValueError, match="no client adapter"):
        append_to_stack(empty, {})
