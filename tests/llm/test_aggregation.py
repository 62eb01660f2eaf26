"""LoRA aggregation maths: FedAvg weights, FedIT approximation error, FFA and FLoRA exactness."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flwr_ext.llm.aggregation import (
    average_of_deltas,
    fedavg_states,
    ffa_aggregate,
    lora_deltas,
    stack_lora,
    stacked_rank,
)
from flwr_ext.llm.lora import adapter_state, apply_lora, load_adapter_state, parse_layers
from flwr_ext.llm.models import tiny_llama

M = "base_model.model.layers.0.q_proj"


def _client(rng, r, d_in=6, d_out=5, a=None):
    return {
        f"{M}.lora_A.weight": a if a is not None else rng.normal(size=(r, d_in)).astype(np.float32),
        f"{M}.lora_B.weight": rng.normal(size=(d_out, r)).astype(np.float32),
    }


def test_fedavg_is_sample_weighted():
    s1 = {"w": np.array([1.0, 0.0], dtype=np.float32)}
    s2 = {"w": np.array([0.0, 1.0], dtype=np.float32)}
    out = fedavg_states([s1, s2], [30, 10])
    np.testing.assert_allclose(out["w"], [0.75, 0.25])
    assert out["w"].dtype == np.float32
    with pytest.raises(ValueError):
        fedavg_states([s1, s2], [0, 0])
    with pytest.raises(ValueError):
        fedavg_states([s1, {"v": s2["w"]}], [1, 1])


def test_separate_averaging_of_a_and_b_is_not_the_average_update():
    rng = np.random.default_rng(0)
    states = [_client(rng, 4), _client(rng, 4)]
    w, s = [3, 1], 2.0
    ideal = average_of_deltas(states, w, [s, s])[M]
    fedit = lora_deltas(fedavg_states(states, w), s)[M]
    rel = np.linalg.norm(fedit - ideal) / np.linalg.norm(ideal)
    assert rel > 0.1  # the cross terms B_k A_j are not small
    # expanding the product reproduces exactly the ideal plus the cross terms
    p = np.array(w) / sum(w)
    A = [st[f"{M}.lora_A.weight"].astype(np.float64) for st in states]
    B = [st[f"{M}.lora_B.weight"].astype(np.float64) for st in states]
    cross = s * (p[0] * p[1]) * (B[0] @ A[1] + B[1] @ A[0] - B[0] @ A[0] - B[1] @ A[1])
    np.testing.assert_allclose(fedit, ideal + cross, atol=1e-5)


def test_ffa_lora_averaging_is_exact():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 6)).astype(np.float32)
    states = [_client(rng, 4, a=a) for _ in range(3)]
    w = [5, 2, 9]
    b_only = [{k: v for k, v in st.items() if "lora_B" in k} for st in states]
    agg = ffa_aggregate(b_only, w, {f"{M}.lora_A.weight": a})
    np.testing.assert_allclose(
        lora_deltas(agg, 2.0)[M], average_of_deltas(states, w, [2.0] * 3)[M], atol=1e-5
    )
    with pytest.raises(ValueError):
        ffa_aggregate(states, w, {})


def test_flora_stacking_is_exact_for_heterogeneous_ranks():
    rng = np.random.default_rng(2)
    ranks, w = [2, 4, 8], [1, 2, 3]
    states = [_client(rng, r) for r in ranks]
    scalings = [16 / r for r in ranks]
    stacked = stack_lora(states, w, scalings)
    A, B = stacked[M]
    assert stacked_rank(stacked) == sum(ranks) == A.shape[0] == B.shape[1]
    np.testing.assert_allclose(B @ A, average_of_deltas(states, w, scalings)[M], atol=1e-5)


def test_peft_adapter_state_roundtrip_and_ffa_freezing(tok):
    model = apply_lora(tiny_llama(len(tok)), r=4, alpha=8, targets="q_proj,v_proj", ffa=True)
    full = adapter_state(model)
    sent = adapter_state(model, trainable_only=True)
    assert set(sent) == {k for k in full if "lora_B" in k} and sent
    assert len(full) == 2 * 2 * 4  # (A, B) x (q, v) x 4 layers
    # same seed -> identical frozen A in another process
    other = apply_lora(tiny_llama(len(tok)), r=4, alpha=8, targets="q_proj,v_proj", ffa=True)
    for k, v in adapter_state(other).items():
        np.testing.assert_array_equal(v, full[k])
    new = {k: np.full_like(v, 0.5) for k, v in sent.items()}
    load_adapter_state(other, new)
    got = adapter_state(other)
    assert all(np.all(got[k] == 0.5) for k in new)
    with pytest.raises(KeyError):
        load_adapter_state(other, {"nope": np.zeros(1)})
    base = [n for n, p in model.named_parameters() if p.requires_grad]
    assert base and all("lora_B" in n for n in base)
    assert torch.is_tensor(next(model.parameters()))


def test_parse_layers_specs():
    assert parse_layers("", 30) is None and parse_layers(None, 30) is None
    assert parse_layers("last:4", 30) == [26, 27, 28, 29]
    assert parse_layers("26-27,0", 30) == [0, 26, 27]
    assert parse_layers([3, 1, 3], 4) == [1, 3]
    for bad in ("last:31", "4", "a-b", "last:0"):
        with pytest.raises(ValueError, match="layers"):
            parse_layers(bad, 4 if bad == "4" else 30)


def test_lora_on_top_layers_only_adapts_them_and_trains(tok):
    model = apply_lora(tiny_llama(len(tok)), r=2, alpha=4, targets="q_proj,v_proj", layers="last:1")
    state = adapter_state(model)
    assert state and all(".layers.3." in k for k in state)
    assert len(state) == 2 * 2  # (A, B) x (q, v) in layer 3 only
    with torch.no_grad():  # make B non-zero so A gets a gradient too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    ids = torch.randint(0, len(tok), (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
