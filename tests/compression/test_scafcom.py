"""SCAFCOM / SCALLION (Huang, Li, Li, ICLR 2024): steps by hand, SCAFFOLD equivalence, and
state identities over many rounds with lost messages, replies and client state (no Ray)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr_ext.asyncfl.testing import NodeListGrid
from flwr_ext.compression import ConfigError, PipelineConfig
from flwr_ext.compression.codec import decode_tensor
from flwr_ext.compression.scafcom import (
    C_RECORD,
    CORRECTION_RECORD,
    KEY_ACCEPTED,
    KEY_LOCAL_STEPS,
    STATE_KEY,
    ScafcomClientState,
    _load,
    client_step,
    client_sync,
    default_compressor,
    scafcom_mod,
)
from flwr_ext.strategies import SCAFCOM, SCALLION

TOP1 = default_compressor(density=0.25)  # top-1 of 4
IDENTITY = PipelineConfig(name="scafcom")


pytestmark = pytest.mark.usefixtures("task_identity")


def _arr(values) -> dict[str, np.ndarray]:
    return {"w": np.asarray(values, dtype=np.float32)}


def _decode(payloads: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {k: decode_tensor(v) for k, v in payloads.items()}


# --------------------------------------------------------------------------- by hand
def test_client_step_by_hand_momentum_topk_and_commit() -> None:
    """Dyadic numbers: every float op below is exact."""
    s = ScafcomClientState(c=_arr([1.0, 0.0, 0.0, 0.0]), v=_arr([2.0, 0.0, 0.0, -4.0]), count=3)
    c = _arr([0.5, 0.5, 0.0, 0.0])
    # K = 2 steps of eta_l = 0.25: K eta_l = 0.5; model delta y - x
    delta = _arr([-1.0, 0.5, 0.0, 1.0])
    # g = (x - y)/(K eta_l) + c_i - c = [2, -1, 0, -2] + [1, 0, 0, 0] - [0.5, 0.5, 0, 0]
    #   = [2.5, -1.5, 0, -2]
    # v_new = 0.5 v + 0.5 g = [2.25, -0.75, 0, -3];  v_new - c_i = [1.25, -0.75, 0, -3]
    payloads, base = client_step(
        s, delta, c, steps=2, lr=0.25, beta=0.5, alpha=1.0, compressor=TOP1
    )
    assert base == 3
    np.testing.assert_array_equal(_decode(payloads)["w"], [0.0, 0.0, 0.0, -3.0])
    np.testing.assert_array_equal(s.pending_v["w"], [2.25, -0.75, 0.0, -3.0])
    np.testing.assert_array_equal(s.pending_c["w"], [0.0, 0.0, 0.0, -3.0])
    np.testing.assert_array_equal(s.c["w"], [1.0, 0.0, 0.0, 0.0])  # not yet committed
    assert not client_sync(s, 4)  # the server applied it
    np.testing.assert_array_equal(s.c["w"], [1.0, 0.0, 0.0, -3.0])
    np.testing.assert_array_equal(s.v["w"], [2.25, -0.75, 0.0, -3.0])
    assert s.count == 4 and s.pending_c is None


def test_scallion_client_step_scales_only_the_control_variate() -> None:
    s = ScafcomClientState(c=_arr([1.0, 0.0, 0.0, 0.0]))
    # K eta_l = 1, c = 0: g = -delta + c_i = [4, 0.5, 0, 0], so g - c_i = [3, 0.5, 0, 0]
    payloads, _ = client_step(
        s,
        _arr([-3.0, -0.5, 0.0, 0.0]),
        {},
        steps=4,
        lr=0.25,
        beta=1.0,
        alpha=0.25,
        compressor=TOP1,
    )
    np.testing.assert_array_equal(_decode(payloads)["w"], [3.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(s.pending_c["w"], [0.75, 0.0, 0.0, 0.0])  # alpha * delta


def test_unbiased_random_k_is_scaled_by_d_over_k() -> None:
    cfg = PipelineConfig(name="scallion", sparsify="randomk", density=0.25)
    s = ScafcomClientState()
    payloads, _ = client_step(
        s,
        _arr([-1.0, -2.0, -4.0, -8.0]),
        {},
        steps=1,
        lr=1.0,
        beta=1.0,
        alpha=1.0,
        compressor=cfg,
        unbiased=True,
        seed=3,
    )
    out = _decode(payloads)["w"]
    kept = np.flatnonzero(out)
    assert kept.size == 1
    assert out[kept[0]] == 4 * [1.0, 2.0, 4.0, 8.0][kept[0]]
    with pytest.raises(ConfigError):
        scafcom_mod(density=0.1, config=TOP1, unbiased=True)


def _train_msg(strategy, rnd: int, x: dict, grid: NodeListGrid) -> list[Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in x.items()})
    return list(strategy.configure_train(rnd, arrays, ConfigRecord({"server-round": rnd}), grid))


def _call(mod, msg: Message, ctx: Context, train) -> Message:
    return mod(msg, ctx, train)


def test_strategy_round_by_hand() -> None:
    """Two nodes, identity compressor: the server step and c by hand."""
    strat = SCAFCOM(
        beta=1.0,
        local_lr=0.25,
        local_steps=2,
        server_lr=1.0,
        fraction_evaluate=0.0,
        min_available_nodes=2,
        min_train_nodes=2,
    )
    mod = scafcom_mod(config=IDENTITY)
    grid = NodeListGrid([1, 2])
    ctx = {n: Context(1, n, {}, RecordDict(), {}) for n in (1, 2)}
    deltas = {1: _arr([-1.0, 0.0, 0.5, 0.0]), 2: _arr([0.0, 1.0, 0.5, -2.0])}
    x = _arr([0.0, 0.0, 0.0, 0.0])
    seen = {}

    def train(node):
        def call(m: Message, c: Context) -> Message:
            seen[node] = {k: v.numpy() for k, v in m.content[CORRECTION_RECORD].items()}
            y = {k: v.numpy() + deltas[node][k] for k, v in m.content["arrays"].items()}
            content = RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in y.items()}),
                    "metrics": MetricRecord({"num-examples": 1}),
                }
            )
            return Message(content, reply_to=m)

        return call

    msgs = _train_msg(strat, 1, x, grid)
    assert all(C_RECORD in m.content for m in msgs)
    replies = [
        _call(mod, m, ctx[m.metadata.dst_node_id], train(m.metadata.dst_node_id)) for m in msgs
    ]
    np.testing.assert_array_equal(seen[1]["w"], np.zeros(4))  # c = c_i = 0 at round 1
    new, metrics = strat.aggregate_train(1, replies)
    # delta_i = g_i - c_i = -delta/(K eta_l): node 1 [2, 0, -1, 0], node 2 [0, -2, -1, 4]
    # x1 = x - 1 * 2 * 0.25 * (0 + mean) = -0.5 * [1, -1, -1, 2]
    np.testing.assert_array_equal(new["w"].numpy(), [-0.5, 0.5, 0.5, -1.0])
    # c = mean c_i = [1, -1, -1, 2]; each node's correction is c - c_i
    np.testing.assert_array_equal(strat.control_variate(x)["w"], [1.0, -1.0, -1.0, 2.0])
    assert metrics["scafcom-accepted"] == 2 and metrics["scafcom-rejected"] == 0
    msgs = _train_msg(strat, 2, {k: v.numpy() for k, v in new.items()}, grid)
    assert all(m.content.config_records["config"][KEY_ACCEPTED] == 1 for m in msgs)
    for m in msgs:
        _call(mod, m, ctx[m.metadata.dst_node_id], train(m.metadata.dst_node_id))
    np.testing.assert_array_equal(seen[1]["w"], [-1.0, -1.0, 0.0, 2.0])
    np.testing.assert_array_equal(seen[2]["w"], [1.0, 1.0, 0.0, -2.0])


def test_zero_dim_tensors_keep_their_shape() -> None:
    """A 0-d scalar (BatchNorm's ``num_batches_tracked``, a scalar weight) stays 0-d in the
    model and in ``c`` (``np.ascontiguousarray`` made it shape ``(1,)``: the next
    ``load_state_dict`` fails, and ``c - c_i`` skips the shape-mismatched scalar)."""
    strat = SCAFCOM(beta=1.0, local_lr=0.5, local_steps=1, fraction_evaluate=0.0)
    mod = scafcom_mod(config=IDENTITY)
    grid = NodeListGrid([1, 2])
    ctx = {n: Context(1, n, {}, RecordDict(), {}) for n in (1, 2)}
    x = {**_arr([0.0, 0.0]), "s": np.array(1.0, np.float32), "n": np.array(3, np.int64)}

    def train(m: Message, c: Context) -> Message:
        y = {k: np.asarray(v.numpy() + 1) for k, v in m.content["arrays"].items()}
        arrays = ArrayRecord({k: Array(v) for k, v in y.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=m)

    for rnd in (1, 2):
        msgs = _train_msg(strat, rnd, x, grid)
        assert all(m.content[C_RECORD]["s"].shape == () for m in msgs)
        replies = [_call(mod, m, ctx[m.metadata.dst_node_id], train) for m in msgs]
        new, _ = strat.aggregate_train(rnd, replies)
        assert {k: v.shape for k, v in new.items()} == {"w": (2,), "s": (), "n": ()}
        x = {k: v.numpy() for k, v in new.items()}


# --------------------------------------------------------------------------- SCAFFOLD
def _grad(w: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * (w - b)).astype(np.float32)  # f_i(w) = 0.5 sum a (w - b)^2


def test_beta_one_identity_compressor_is_scaffold() -> None:
    """Against SCAFFOLD's two-vector form (Karimireddy et al. 2020, Alg. 1, option II)."""
    rng = np.random.default_rng(0)
    n, dim, K, lr, eta_g, rounds = 4, 6, 3, 0.1, 0.8, 8
    a = rng.uniform(0.5, 2.0, (n, dim)).astype(np.float32)
    b = rng.normal(0, 1, (n, dim)).astype(np.float32)
    strat = SCAFCOM(
        beta=1.0,
        local_lr=lr,
        local_steps=K,
        server_lr=eta_g,
        fraction_evaluate=0.0,
        min_available_nodes=n,
        min_train_nodes=n,
    )
    mod = scafcom_mod(config=IDENTITY)
    grid = NodeListGrid(list(range(1, n + 1)))
    ctx = {i: Context(1, i, {}, RecordDict(), {}) for i in grid.nodes}
    # reference SCAFFOLD state
    x_ref = np.zeros(dim, np.float32)
    c_ref, ci_ref = np.zeros(dim), np.zeros((n, dim))
    x = {"w": np.zeros(dim, np.float32)}
    for rnd in range(1, rounds + 1):
        # reference round
        ys, dcs = [], []
        for i in range(n):
            y = x_ref.astype(np.float64)
            for _ in range(K):
                y = y - lr * (a[i] * (y - b[i]) - ci_ref[i] + c_ref)
            ci_new = ci_ref[i] - c_ref + (x_ref - y) / (K * lr)
            ys.append(y - x_ref)
            dcs.append(ci_new - ci_ref[i])
            ci_ref[i] = ci_new
        x_ref = x_ref + eta_g * np.mean(ys, axis=0)
        c_ref = c_ref + np.sum(dcs, axis=0) / n

        # SCAFCOM round through the mod and the strategy
        def train(node):
            def call(got: Message, c: Context) -> Message:
                corr = got.content[CORRECTION_RECORD]["w"].numpy()
                y = got.content["arrays"]["w"].numpy().copy()
                for _ in range(K):
                    y = (y - lr * (_grad(y, a[node - 1], b[node - 1]) + corr)).astype(np.float32)
                content = RecordDict(
                    {
                        "arrays": ArrayRecord({"w": Array(y)}),
                        "metrics": MetricRecord({"num-examples": 1}),
                    }
                )
                return Message(content, reply_to=got)

            return call

        msgs = _train_msg(strat, rnd, x, grid)
        replies = [
            _call(mod, m, ctx[m.metadata.dst_node_id], train(m.metadata.dst_node_id)) for m in msgs
        ]
        new, _ = strat.aggregate_train(rnd, replies)
        x = {k: v.numpy() for k, v in new.items()}
        np.testing.assert_allclose(x["w"], x_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(strat.control_variate(x)["w"], c_ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- identities
@pytest.mark.parametrize("variant", ["scafcom", "scallion"])
def test_mirrors_equal_client_states_bit_exactly_with_losses(variant: str) -> None:
    """40 rounds, 6 nodes, partial participation; lost train messages, lost replies and lost
    client states. After every round: each node's committed c_i (plus the pending one the
    server applied) equals the server's mirror bit for bit, and c is their mean."""
    rnd_gen = random.Random(1)
    rng = np.random.default_rng(1)
    nodes = list(range(1, 7))
    kw = dict(
        local_lr=0.1,
        local_steps=2,
        fraction_train=0.5,
        fraction_evaluate=0.0,
        min_available_nodes=6,
        min_train_nodes=2,
    )
    if variant == "scafcom":
        strat, mod = SCAFCOM(beta=0.3, **kw), scafcom_mod(density=0.25)
    else:
        strat, mod = SCALLION(alpha=0.5, **kw), scafcom_mod(density=0.25, unbiased=True)
    grid = NodeListGrid(nodes)
    ctx = {i: Context(1, i, {}, RecordDict(), {}) for i in nodes}
    x = {"w": rng.normal(0, 1, (3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    lost_msgs = lost_replies = resets = 0

    def train(m: Message, c: Context) -> Message:
        y = {
            k: (v.numpy() + rng.normal(0, 0.1, v.shape)).astype(np.float32)
            for k, v in m.content["arrays"].items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in y.items()}),
                "metrics": MetricRecord(
                    {"num-examples": 1, KEY_LOCAL_STEPS: rnd_gen.choice([1, 2, 3])}
                ),
            }
        )
        return Message(content, reply_to=m)

    for rnd in range(1, 41):
        replies = []
        for m in _train_msg(strat, rnd, x, grid):
            node = m.metadata.dst_node_id
            if rnd_gen.random() < 0.1:
                lost_msgs += 1
                continue
            if rnd_gen.random() < 0.05:
                ctx[node] = Context(1, node, {}, RecordDict(), {})  # state lost
                resets += 1
            out = _call(mod, m, ctx[node], train)
            if rnd_gen.random() < 0.15:
                lost_replies += 1
                continue
            replies.append(out)
        new, _ = strat.aggregate_train(rnd, replies)
        if new is not None:
            x = {k: v.numpy() for k, v in new.items()}
        # identity check: what each client will hold once it syncs == the server's mirror
        for node in nodes:
            s = _load(ctx[node], STATE_KEY)
            client_sync(s, strat.state.accepted.get(node, 0))
            mirror = strat.state.mirrors.get(node, {})
            assert s.count == strat.state.accepted.get(node, 0)
            for name in set(s.c) | set(mirror):
                assert np.array_equal(s.c[name], mirror[name]), (rnd, node, name)
        c = strat.control_variate(x)
        for name in ("w", "b"):
            acc = np.zeros(x[name].shape)
            for node in sorted(strat.state.mirrors):
                acc += strat.state.mirrors[node][name]
            np.testing.assert_array_equal(c[name], (acc / 6).astype(np.float32))
    assert lost_msgs and lost_replies and resets


def test_lost_reply_counts_as_not_sampled() -> None:
    """A node whose reply is lost ends with the same c_i and v_i as if it had sat out."""
    a, b = ScafcomClientState(), ScafcomClientState()
    for s in (a, b):
        client_step(
            s, _arr([1.0, 2.0, 0.0, 0.0]), {}, steps=1, lr=1.0, beta=0.5, alpha=1.0, compressor=TOP1
        )
        client_sync(s, 1)
    client_step(
        a, _arr([-8.0, 0.0, 4.0, 0.0]), {}, steps=1, lr=1.0, beta=0.5, alpha=1.0, compressor=TOP1
    )  # reply lost: server still says 1
    assert not client_sync(a, 1)
    assert a.count == b.count == 1
    for name in a.c:
        assert np.array_equal(a.c[name], b.c[name]) and np.array_equal(a.v[name], b.v[name])


def test_wrong_or_garbled_replies_are_rejected() -> None:
    strat = SCAFCOM(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    grid = NodeListGrid([1, 2])
    msgs = _train_msg(strat, 1, _arr([0.0] * 4), grid)
    plain = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.ones(4, np.float32))}),
                    "metrics": MetricRecord({"num-examples": 1}),
                    "scafcom": ConfigRecord({"scafcom-base": 0}),
                }
            ),
            reply_to=m,
        )
        for m in msgs
    ]
    new, metrics = strat.aggregate_train(1, plain)
    assert new is None and strat.state.mirrors == {}


def test_constructor_validation() -> None:
    with pytest.raises(ValueError):
        SCAFCOM(beta=0.0)
    with pytest.raises(ValueError):
        SCAFCOM(local_steps=0)
    with pytest.raises(ValueError):
        SCAFCOM(server_lr=float("nan"))
    with pytest.raises(ValueError):
        SCALLION(alpha=1.5)
    with pytest.raises(TypeError):
        SCALLION(beta=0.5)
    with pytest.raises(ConfigError):
        scafcom_mod(config=PipelineConfig(sparsify="topk", density=0.1, error_feedback=True))
