"""EF21 (Richtarik et al. 2021): state identities, by hand and over many rounds (no Ray)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr_ext.asyncfl.testing import NodeListGrid
from flwr_ext.compression import ConfigError, PipelineConfig
from flwr_ext.compression.codec import decode_tensor
from flwr_ext.compression.ef21 import (
    KEY_ACCEPTED,
    BCNodeState,
    EF21ClientState,
    EF21ServerState,
    Receipt,
    _load,
    _load_bc,
    _save,
    _save_bc,
    client_step,
    client_sync,
    default_compressor,
    ef21_mod,
)
from flwr_ext.compression.server import decode_deltas
from flwr_ext.strategies import EF21

TOP1 = default_compressor(density=0.25)  # top-1 of 4


pytestmark = pytest.mark.usefixtures("task_identity")


def _decode(payloads: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {k: decode_tensor(v) for k, v in payloads.items()}


def test_client_and_server_steps_by_hand() -> None:
    a, b = EF21ClientState(), EF21ClientState()
    server = EF21ServerState()
    like = {"w": np.zeros(4)}
    # round 1: g_i = 0, so c_i = top-1(delta_i)
    pa, base_a = client_step(a, {"w": np.array([1.0, -3.0, 0.5, 0.0])}, TOP1)
    pb, base_b = client_step(b, {"w": np.array([2.0, 0.0, 0.0, 1.0])}, TOP1)
    ca, cb = _decode(pa), _decode(pb)
    np.testing.assert_array_equal(ca["w"], [0.0, -3.0, 0.0, 0.0])
    np.testing.assert_array_equal(cb["w"], [2.0, 0.0, 0.0, 0.0])
    assert (base_a, base_b) == (0, 0)
    assert server.receive(1, base_a, ca) is Receipt.ACCEPTED
    assert server.receive(2, base_b, cb) is Receipt.ACCEPTED
    np.testing.assert_array_equal(server.mean(2, like)["w"], [1.0, -1.5, 0.0, 0.0])
    # round 2: the server acknowledges, the clients commit g_i <- g_i + c_i
    assert not client_sync(a, server.accepted[1]) and not client_sync(b, server.accepted[2])
    np.testing.assert_array_equal(a.g["w"], [0.0, -3.0, 0.0, 0.0])
    assert a.count == 1 and a.pending is None
    # c_a = top-1(delta - g_a) = top-1([1, 0, 0.5, 0]) = [1, 0, 0, 0]
    pa, base_a = client_step(a, {"w": np.array([1.0, -3.0, 0.5, 0.0])}, TOP1)
    np.testing.assert_array_equal(_decode(pa)["w"], [1.0, 0.0, 0.0, 0.0])
    assert base_a == 1
    server.receive(1, base_a, _decode(pa))
    # g = (g_a + g_b) / 2 with g_a = [1, -3, 0, 0] (b did not take part: EF21-PP)
    np.testing.assert_array_equal(server.mean(2, like)["w"], [1.5, -1.5, 0.0, 0.0])
    # a third node that never replied counts as g_i = 0 in the mean
    np.testing.assert_array_equal(server.mean(3, like)["w"], [1.0, -1.0, 0.0, 0.0])


def test_lost_reply_lost_state_and_wrong_base() -> None:
    c = EF21ClientState()
    server = EF21ServerState()
    delta = {"w": np.array([1.0, 2.0, 3.0, 4.0])}
    client_step(c, delta, TOP1)  # reply lost: the server never calls receive
    assert not client_sync(c, server.accepted.get(7, 0))  # accepted 0: pending dropped
    assert c.count == 0 and c.g == {} and c.pending is None
    p, base = client_step(c, delta, TOP1)
    assert server.receive(7, base, _decode(p)) is Receipt.ACCEPTED
    client_sync(c, server.accepted[7])
    np.testing.assert_array_equal(c.g["w"], server.mirrors[7]["w"])
    # the client loses its state: base 0 makes the server reset its mirror first
    fresh = EF21ClientState()
    assert client_sync(fresh, server.accepted[7]) is True  # counts differ: restart at 0
    p, base = client_step(fresh, {"w": np.array([0.0, 0.0, 0.0, -1.0])}, TOP1)
    assert base == 0
    assert server.receive(7, base, _decode(p)) is Receipt.RESYNCED
    np.testing.assert_array_equal(server.mirrors[7]["w"], [0.0, 0.0, 0.0, -1.0])
    assert server.receive(7, 5, _decode(p)) is Receipt.REJECTED  # neither 1 nor 0
    assert server.accepted[7] == 1


def test_ef21_refuses_a_compressor_with_its_own_error_feedback() -> None:
    with pytest.raises(ConfigError):
        ef21_mod(config=PipelineConfig(sparsify="topk", density=0.1, error_feedback=True))


# ------------------------------------------------------------------ many rounds, real messages
INIT = {
    "w": np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32),
    "b": np.zeros(5, np.float32),
}


def _trainer(target: dict[str, np.ndarray]):
    """A ClientApp body: one gradient step of 0.5 * ||x - target_i||^2 with lr 0.3."""

    def call_next(msg: Message, ctx: Context) -> Message:
        new = {
            k: v.numpy() - 0.3 * (v.numpy() - target[k]) for k, v in msg.content["arrays"].items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v.astype(np.float32)) for k, v in new.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def _targets(nodes: list[int]) -> dict[int, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return {
        n: {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in INIT.items()}
        for n in nodes
    }


def _run(strategy: EF21, rounds: int, mod, *, lose=(), reset=(), nodes=(1, 2, 3, 4)):
    grid = NodeListGrid(list(nodes))
    targets = _targets(list(nodes))
    ctxs = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    history = []
    for rnd in range(1, rounds + 1):
        if rnd in reset:  # node 2 loses its context.state
            ctxs[2] = Context(
                run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={}
            )
        msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = []
        for m in msgs:
            node = m.metadata.dst_node_id
            assert m.content["config"][KEY_ACCEPTED] == strategy.state.accepted.get(node, 0)
            reply = mod(m, ctxs[node], _trainer(targets[node]))
            if (rnd, node) not in lose:
                replies.append(reply)
        g_before = strategy.state.mean(len(nodes), INIT)
        new, metrics = strategy.aggregate_train(rnd, replies)
        history.append((g_before, strategy.state.mean(len(nodes), INIT), replies, metrics))
        arrays = new
    return arrays, ctxs, history


def _client_g(ctx: Context) -> dict[str, np.ndarray]:
    """The client's g_i as the next sync would commit it (pending applied when acknowledged)."""
    rec = ctx.state["flwr-ext.ef21.g"]
    return {k: v.numpy() for k, v in rec.items()}


def test_server_mirrors_equal_client_states_bit_exactly_after_many_rounds() -> None:
    random.seed(0)  # Flower's sample_nodes draws with `random`
    strategy = EF21(
        fraction_evaluate=0.0, fraction_train=0.75, min_available_nodes=4, min_train_nodes=3
    )
    mod = ef21_mod(density=0.1)
    lose = {(5, 1), (9, 3), (14, 4)}
    arrays, ctxs, history = _run(strategy, 30, mod, lose=lose, reset={20})
    # one more configure + sync so that every client commits its last acknowledged c_i
    grid = NodeListGrid([1, 2, 3, 4])
    list(strategy.configure_train(31, arrays, ConfigRecord(), grid))

    for node, ctx in ctxs.items():
        state = _load(ctx, "flwr-ext.ef21")
        client_sync(state, strategy.state.accepted.get(node, 0))
        mirror = strategy.state.mirrors.get(node, {})
        assert set(state.g) == set(mirror)
        for k in state.g:
            assert np.array_equal(state.g[k], mirror[k]), (node, k)  # bit-exact
            assert state.g[k].dtype == np.float32
    # server g is the mean of the client g_i, bit for bit (float64 sum in node order)
    g = strategy.state.mean(4, INIT)
    clients = [_load(ctxs[n], "flwr-ext.ef21") for n in sorted(ctxs)]
    for n, st in zip(sorted(ctxs), clients, strict=True):
        client_sync(st, strategy.state.accepted.get(n, 0))
    for k in INIT:
        want = (sum(st.g[k].astype(np.float64) for st in clients) / 4).astype(np.float32)
        assert np.array_equal(g[k], want)
    # every delivered reply was applied; node 2's first reply after losing its state resynced
    total = {"accepted": 0, "resynced": 0, "rejected": 0}
    for *_, metrics in history:
        for key in total:
            total[key] += metrics[f"ef21-{key}"]
    delivered = sum(len(replies) for _, _, replies, _ in history)
    assert total["rejected"] == 0 and total["resynced"] == 1
    assert total["accepted"] + total["resynced"] == delivered


def test_round_update_is_the_mean_correction_by_hand() -> None:
    strategy = EF21(fraction_evaluate=0.0, min_available_nodes=2)
    mod = ef21_mod(density=0.1)
    _, _, history = _run(strategy, 3, mod, nodes=(1, 2))
    for before, after, replies, _ in history:
        ref = {k: (v.shape, str(v.dtype)) for k, v in INIT.items()}
        cs = [decode_deltas(r.content["arrays"], ref) for r in replies]
        for k in INIT:
            np.testing.assert_allclose(after[k], before[k] + (cs[0][k] + cs[1][k]) / 2, atol=1e-6)


def test_identity_compressor_full_participation_is_uniform_fedavg() -> None:
    strategy = EF21(fraction_evaluate=0.0, min_available_nodes=3)
    mod = ef21_mod(config=PipelineConfig(name="ef21", sparsify="none"))
    arrays, _, history = _run(strategy, 4, mod, nodes=(1, 2, 3))
    targets = _targets([1, 2, 3])
    x = {k: v.copy() for k, v in INIT.items()}
    for _ in range(4):
        news = [{k: x[k] - 0.3 * (x[k] - targets[n][k]) for k in x} for n in (1, 2, 3)]
        x = {k: (sum(m[k] for m in news) / 3).astype(np.float32) for k in x}
    for k in INIT:
        np.testing.assert_allclose(arrays[k].numpy(), x[k], atol=1e-5)
    assert history[-1][3]["uplink-bytes-per-update"] > 0


def test_replies_that_are_not_corrections_are_rejected() -> None:
    strategy = EF21(fraction_evaluate=0.0, min_available_nodes=2)
    grid = NodeListGrid([1, 2])
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    plain = [_trainer(_targets([1, 2])[1])(m, None) for m in msgs]  # no ef21_mod
    new, metrics = strategy.aggregate_train(1, plain)
    assert metrics["ef21-rejected"] == 2 and metrics["ef21-accepted"] == 0
    for k in INIT:
        np.testing.assert_array_equal(new[k].numpy(), INIT[k])  # g = 0: no step
    with pytest.raises(ValueError):
        EF21(server_lr=0.0)


def test_zero_dim_tensors_keep_their_shape() -> None:
    """A 0-d scalar stays 0-d in the new model (``np.ascontiguousarray`` made it ``(1,)``)."""
    strategy = EF21(fraction_evaluate=0.0, min_available_nodes=2)
    mod = ef21_mod(config=PipelineConfig(name="ef21", sparsify="none"))
    grid = NodeListGrid([1, 2])
    ctxs = {n: Context(1, n, {}, RecordDict(), {}) for n in (1, 2)}

    def train(msg: Message, ctx: Context) -> Message:
        y = {k: np.asarray(v.numpy() + 1) for k, v in msg.content["arrays"].items()}
        arrays = ArrayRecord({k: Array(v) for k, v in y.items()})
        content = RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})})
        return Message(content, reply_to=msg)

    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32)), "s": Array(np.array(1.0, "f4"))})
    for rnd in (1, 2):
        msgs = strategy.configure_train(rnd, arrays, ConfigRecord(), grid)
        replies = [mod(m, ctxs[m.metadata.dst_node_id], train) for m in msgs]
        arrays, _ = strategy.aggregate_train(rnd, replies)
        assert {k: v.shape for k, v in arrays.items()} == {"w": (2,), "s": ()}


def test_zero_dim_tensors_keep_their_shape_in_context_state() -> None:
    """A 0-d ``g_i`` (or EF21-BC model scalar) comes back 0-d from ``context.state``; as
    ``(1,)`` the next ``_add`` would replace it by zeros (client and server mirror apart)."""
    ctx = Context(1, 1, {}, RecordDict(), {})
    scalar = {"s": np.array(2.0, np.float32), "n": np.array(3, np.int64)}
    _save(ctx, "k", EF21ClientState(g=dict(scalar), count=1, pending=dict(scalar)))
    state = _load(ctx, "k")
    assert {k: v.shape for k, v in state.g.items()} == {"s": (), "n": ()}
    assert {k: v.shape for k, v in (state.pending or {}).items()} == {"s": (), "n": ()}
    _save_bc(ctx, "k", BCNodeState(x=dict(scalar), g=dict(scalar), version=1))
    bc = _load_bc(ctx, "k")
    assert {k: v.shape for k, v in bc.x.items()} == {"s": (), "n": ()}
    assert {k: v.shape for k, v in bc.g.items()} == {"s": (), "n": ()}
