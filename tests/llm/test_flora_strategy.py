"""The FLoRA strategy class on Flower messages: stacking, weights, scalings, error replies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from flwr_ext.strategies import FLoRA

M = "base_model.model.layers.0.q_proj"
D_IN, D_OUT = 6, 5


@pytest.fixture(autouse=True)
def _task_identity():
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def _adapter(rng, r):
    return {
        f"{M}.lora_A.weight": rng.normal(size=(r, D_IN)).astype(np.float32),
        f"{M}.lora_B.weight": rng.normal(size=(D_OUT, r)).astype(np.float32),
    }


def _reply(msg, adapter, n, scaling):
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in adapter.items()}),
            "metrics": MetricRecord({"num-examples": n, "lora-scaling": scaling}),
        }
    )
    return Message(content, reply_to=msg)


def _product(rec):
    return rec[f"{M}.flora_B"].numpy().astype(np.float64) @ rec[f"{M}.flora_A"].numpy()


def test_flora_stacks_heterogeneous_ranks_exactly_over_two_rounds():
    rng = np.random.default_rng(0)
    strat = FLoRA(fraction_evaluate=0.0, min_available_nodes=3)
    stack = ArrayRecord(
        {
            f"{M}.flora_A": Array(np.zeros((0, D_IN), np.float32)),
            f"{M}.flora_B": Array(np.zeros((D_OUT, 0), np.float32)),
        }
    )
    grid = _Grid([11, 12, 13])
    expected = np.zeros((D_OUT, D_IN))
    ranks = {11: 2, 12: 4, 13: 8}
    for rnd in (1, 2):
        msgs = list(strat.configure_train(rnd, stack, ConfigRecord(), grid))
        assert len(msgs) == 3
        replies, update = [], np.zeros((D_OUT, D_IN))
        weights = {11: 10, 12: 30, 13: 60}
        for m in msgs:
            node = m.metadata.dst_node_id
            ad = _adapter(rng, ranks[node])
            scaling = 16.0 / ranks[node]
            replies.append(_reply(m, ad, weights[node], scaling))
            p = weights[node] / 100
            update += p * scaling * (ad[f"{M}.lora_B.weight"] @ ad[f"{M}.lora_A.weight"])
        # an error reply is skipped, not stacked
        replies.append(Message(Error(code=1, reason="boom"), reply_to=msgs[0]))
        new, metrics = strat.aggregate_train(rnd, replies)
        expected = expected + update
        assert new[f"{M}.flora_A"].numpy().shape == (14 * rnd, D_IN)
        assert new[f"{M}.flora_B"].numpy().shape == (D_OUT, 14 * rnd)
        assert metrics["flora-rank"] == 14 * rnd
        # B @ A is the sum of all rounds' weighted, scaled client products (no cross terms)
        np.testing.assert_allclose(_product(new), expected, rtol=1e-4, atol=1e-4)
        stack = new
    assert strat.aggregate_train(3, [Message(Error(code=1), reply_to=msgs[0])]) == (None, None)
