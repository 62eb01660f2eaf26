"""ClientLevelDP (server-side clipping + Gaussian noise): clipping, weights, noise size, failures.

Defect 3 of issue 14: the noise std must not depend on how many replies arrived (m is exactly what
differs between neighbouring datasets under add/remove-one-client adjacency). The denominator is
the configured ``num_sampled_clients`` (McMahan et al. 2018's fixed-denominator estimator).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_ext.privacy import ClientLevelDP, compute_epsilon

SIGMA, CLIP, W = 0.8, 0.5, 4


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages built outside a Flower runtime need a task identity; restore it after."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def _strategy(sigma: float = SIGMA, clip: float = CLIP, expected: int = W) -> ClientLevelDP:
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0)
    return ClientLevelDP(inner, sigma, clip, expected, delta=1e-5)


def _reply(arrays: dict[str, np.ndarray], num_examples: int, node: int) -> Message:
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": num_examples}),
        }
    )
    return Message(content, reply_to=msg)


def _failed(node: int) -> Message:
    msg = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(Error(code=1, reason="client crashed"), reply_to=msg)


def _release(strategy: ClientLevelDP, current: dict, replies: list[Message]) -> dict:
    strategy.current_arrays = ArrayRecord({k: Array(v) for k, v in current.items()})
    arrays, _ = strategy.aggregate_train(1, replies)
    return {k: v.numpy() for k, v in arrays.items()}


def test_updates_are_clipped_to_c_weighted_uniformly_and_divided_by_the_configured_count():
    current = {"w": np.array([1.0, -2.0, 0.5], np.float32), "b": np.zeros(2, np.float32)}
    deltas = [
        {"w": np.array([3.0, 0.0, 4.0], np.float32), "b": np.zeros(2, np.float32)},  # norm 5
        {"w": np.array([0.0, 0.1, 0.0], np.float32), "b": np.array([0.2, 0.0], np.float32)},
    ]
    replies = [
        _reply({k: current[k] + d[k] for k in current}, n, node)
        for node, (d, n) in enumerate(zip(deltas, [1, 1000], strict=True), start=1)
    ]
    out = _release(_strategy(sigma=1e-9), current, replies)  # noise ~1e-10
    clipped0 = {k: v * CLIP / 5.0 for k, v in deltas[0].items()}  # scaled to norm C
    clipped1 = deltas[1]  # norm 0.224 < C: untouched
    for k in current:
        # uniform weights (num-examples 1 vs 1000 ignored), sum divided by W = 4, not m = 2
        expected = current[k] + (clipped0[k] + clipped1[k]) / W
        np.testing.assert_allclose(out[k], expected, atol=1e-6)


@pytest.mark.parametrize("failed", [0, 2])
def test_noise_std_is_sigma_c_over_the_configured_count_whatever_m(failed):
    n = 200_000
    current = {"w": np.zeros(n, np.float32)}
    update = {"w": np.zeros(n, np.float32)}
    update["w"][0] = 1e-3  # a tiny update: the released array is (almost) the noise alone
    replies = [_reply(update, 10, node) for node in range(1, W - failed + 1)]
    replies += [_failed(node) for node in range(W - failed + 1, W + 1)]
    out = _release(_strategy(), current, replies)["w"]
    expected = SIGMA * CLIP / W
    # relative standard error of a sample std over n draws: 1 / sqrt(2n) = 0.16 %
    assert out.std() == pytest.approx(expected, rel=6 / math.sqrt(2 * n))
    assert abs(out.mean()) < 6 * expected / math.sqrt(n)


def test_failed_client_is_left_out_and_the_round_is_composed_once():
    current = {"w": np.zeros(3, np.float32)}
    delta = np.array([0.3, 0.0, 0.0], np.float32)
    strategy = _strategy(sigma=1e-9)
    out = _release(strategy, current, [_reply({"w": delta}, 5, 1), _failed(2)])["w"]
    np.testing.assert_allclose(out, delta / W, atol=1e-6)  # shrinks by m / W (1 of 4 replied)
    assert strategy.history == [(1e-9, 1.0, 1)]
    assert _strategy().aggregate_train(1, [_failed(1)]) == (None, None)


def test_client_epsilon_in_flowers_types_matches_flowers_rdp_accountant():
    pytest.importorskip("dp_accounting")
    from flwr.serverapp import RdpAccountant

    strategy = _strategy(sigma=1.1)
    current = {"w": np.zeros(4, np.float32)}
    for _ in range(5):
        _release(strategy, current, [_reply(current, 1, i) for i in range(1, W + 1)])
    spent = strategy.privacy_spent()
    assert isinstance(spent, PrivacySpent)
    assert spent.num_releases == 5 and spent.delta == 1e-5 and spent.accounting_method == "rdp"
    assert spent.epsilon == pytest.approx(compute_epsilon([(1.1, 1.0, 5)], 1e-5, "rdp"))
    flower = RdpAccountant(
        PrivacyConfig(
            target_delta=1e-5,
            population_size=W,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    flower.compose(GaussianPrivacyEvent(1.1, W, W), count=5)
    # Opacus' and dp-accounting's RDP use different order grids: equal to ~1 %
    assert spent.epsilon == pytest.approx(flower.get_epsilon(1e-5), rel=0.01)
