"""EF21-BC (Fatkhullin et al. 2021): node and server hold the same x and g, bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from flwr_ext.asyncfl.testing import NodeListGrid
from flwr_ext.compression import PipelineConfig
from flwr_ext.compression.codec import decode_tensor
from flwr_ext.compression.ef21 import (
    BC_G_RECORD,
    STATE_KEY,
    _load,
    _load_bc,
    bc_step,
    client_sync,
    ef21_mod,
)
from flwr_ext.strategies import EF21, EF21BC

pytestmark = pytest.mark.usefixtures("task_identity")


INIT = {
    "w": np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32),
    "b": np.zeros(5, np.float32),
}
TARGETS = {
    n: {
        k: np.random.default_rng(10 + n).standard_normal(v.shape).astype(np.float32)
        for k, v in INIT.items()
    }
    for n in (1, 2, 3, 4)
}


def _trainer(node: int, seen: list):
    """One gradient step of 0.5 ||x - target||^2 (lr 0.3); records the x it was given."""

    def call_next(msg: Message, ctx: Context) -> Message:
        x = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        seen.append((node, x))
        new = {k: (x[k] - 0.3 * (x[k] - TARGETS[node][k])).astype(np.float32) for k in x}
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                "metrics": MetricRecord({"num-examples": 10}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def test_bc_step_by_hand() -> None:
    x = {"w": np.array([1.0, 1.0]), "n": np.array([3])}
    g = {"w": np.array([0.5, 0.0])}
    b = {"w": np.array([0.0, -1.0]), "n": np.array([0])}
    x1, g1 = bc_step(x, g, b, 0.5)
    np.testing.assert_array_equal(g1["w"], [0.5, -1.0])  # g <- g + b
    np.testing.assert_array_equal(x1["w"], [1.25, 0.5])  # x <- x + 0.5 g
    np.testing.assert_array_equal(x1["n"], [3])  # integers do not move


def _run(strategy, rounds: int, *, lose_msg=(), lose_reply=(), reset=(), nodes=(1, 2, 3, 4)):
    grid = NodeListGrid(list(nodes))
    ctxs = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in nodes
    }
    mod = ef21_mod(density=0.2)
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    seen: list = []
    history = []
    for rnd in range(1, rounds + 1):
        for n in reset:
            if n[0] == rnd:
                ctxs[n[1]] = Context(
                    run_id=1, node_id=n[1], node_config={}, state=RecordDict(), run_config={}
                )
        x_server = {k: v.copy() for k, v in strategy.x.items()} if strategy.x else dict(INIT)
        replies = []
        for m in strategy.configure_train(rnd, arrays, ConfigRecord(), grid):
            node = m.metadata.dst_node_id
            if (rnd, node) in lose_msg:
                continue
            seen.clear()
            reply = mod(m, ctxs[node], _trainer(node, seen))
            if not reply.has_error():
                # the ClientApp trained from exactly the server's x of this round
                for name in INIT:
                    assert np.array_equal(seen[0][1][name], x_server[name]), (rnd, node)
            if (rnd, node) not in lose_reply:
                replies.append(reply)
        arrays, metrics = strategy.aggregate_train(rnd, replies)
        history.append(metrics)
    return arrays, ctxs, history


def test_nodes_hold_the_servers_x_and_g_bit_exactly_after_many_rounds() -> None:
    random.seed(1)
    strategy = EF21BC(
        downlink_density=0.2,
        server_lr=1.0,
        fraction_evaluate=0.0,
        fraction_train=0.75,
        min_available_nodes=4,
        min_train_nodes=3,
    )
    arrays, ctxs, history = _run(
        strategy, 25, lose_msg={(4, 2), (11, 1)}, lose_reply={(7, 3)}, reset={(15, 4)}
    )
    assert sum(m["ef21-bc-dense"] for m in history) >= 4  # round 1 and every catch-up
    synced = 0
    for node, ctx in ctxs.items():
        bc = _load_bc(ctx, STATE_KEY)
        if bc.version == strategy.version - 1:  # the node took part in the last round
            # apply the last broadcast b, as the node will on its next message
            b = {k: decode_tensor(a.data, stype=a.stype) for k, a in strategy._b.items()}
            bc.x, bc.g = bc_step(bc.x, bc.g, b, strategy.server_lr)
            bc.version += 1
        synced += bc.version == strategy.version
        if bc.version == strategy.version:
            for k in INIT:
                assert np.array_equal(bc.x[k], strategy.x[k]), (node, k)
                assert np.array_equal(bc.g[k], strategy.g[k]), (node, k)
        # the uplink mirrors as in EF21
        up = _load(ctx, STATE_KEY)
        client_sync(up, strategy.state.accepted.get(node, 0))
        for k in up.g:
            assert np.array_equal(up.g[k], strategy.state.mirrors[node][k])
    assert synced >= 3
    for k in INIT:
        np.testing.assert_array_equal(arrays[k].numpy(), strategy.x[k])


def test_downlink_is_compressed_after_the_first_round() -> None:
    strategy = EF21BC(downlink_density=0.1, fraction_evaluate=0.0, min_available_nodes=3)
    _, _, history = _run(strategy, 4, nodes=(1, 2, 3))
    dense = sum(v.nbytes for v in INIT.values())
    assert history[0]["ef21-bc-dense"] == 3
    assert history[0]["downlink-bytes-per-node"] > 2 * dense  # x and g
    for m in history[1:]:
        assert m["ef21-bc-dense"] == 0
        assert m["downlink-bytes-per-node"] < dense / 3


def test_with_the_identity_downlink_it_is_ef21() -> None:
    ident = PipelineConfig(name="ef21-bc", sparsify="none")
    bc = EF21BC(downlink=ident, fraction_evaluate=0.0, min_available_nodes=3)
    plain = EF21(fraction_evaluate=0.0, min_available_nodes=3)
    bc_arrays, _, _ = _run(bc, 5, nodes=(1, 2, 3))
    # EF21 with the same uplink: run it the same way (no BC state in the messages)
    grid = NodeListGrid([1, 2, 3])
    ctxs = {
        n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={})
        for n in (1, 2, 3)
    }
    mod = ef21_mod(density=0.2)
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    for rnd in range(1, 6):
        msgs = list(plain.configure_train(rnd, arrays, ConfigRecord(), grid))
        replies = [
            mod(m, ctxs[m.metadata.dst_node_id], _trainer(m.metadata.dst_node_id, [])) for m in msgs
        ]
        arrays, _ = plain.aggregate_train(rnd, replies)
    for k in INIT:
        np.testing.assert_allclose(bc_arrays[k].numpy(), arrays[k].numpy(), atol=1e-5)


def test_a_node_that_cannot_apply_b_answers_with_an_error_and_gets_the_dense_state() -> None:
    strategy = EF21BC(downlink_density=0.2, fraction_evaluate=0.0, min_available_nodes=2)
    _, ctxs, _ = _run(strategy, 2, nodes=(1, 2))
    grid = NodeListGrid([1, 2])
    arrays = ArrayRecord({k: Array(v) for k, v in strategy.x.items()})
    msgs = list(strategy.configure_train(3, arrays, ConfigRecord(), grid))
    assert all(BC_G_RECORD not in m.content for m in msgs)  # both in sync: increments only
    fresh = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    mod = ef21_mod(density=0.2)
    replies = [
        mod(
            m,
            fresh if m.metadata.dst_node_id == 1 else ctxs[2],
            _trainer(m.metadata.dst_node_id, []),
        )
        for m in msgs
    ]
    assert replies[[m.metadata.dst_node_id for m in msgs].index(1)].has_error()
    _, metrics = strategy.aggregate_train(3, replies)
    assert metrics["ef21-accepted"] == 1
    msgs = list(strategy.configure_train(4, arrays, ConfigRecord(), grid))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    assert BC_G_RECORD in by_node[1].content and BC_G_RECORD not in by_node[2].content
