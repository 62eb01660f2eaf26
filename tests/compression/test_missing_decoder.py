"""Compressed replies to a plain Flower strategy: an error that says what to do (issue 15.6)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from flwr_ext.compression import compression_mod
from flwr_ext.compression.hints import (
    HINT,
    MissingDecoderError,
    announce_decoder,
    check_decodable,
    explain_missing_decoder,
    missing_decoder_error,
    server_decodes,
)


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are built outside a Flower run (as in test_compression_flower)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


GLOBAL = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}


def _train_msg(node: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def _trainer(msg: Message, ctx: Context) -> Message:
    new = {k: v.numpy() + 0.1 for k, v in msg.content["arrays"].items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
            "metrics": MetricRecord({"num-examples": 10}),
        }
    )
    return Message(content, reply_to=msg)


def _compressed_replies() -> list[Message]:
    mod = compression_mod("fedzip")
    out = []
    for node in (3, 4):
        ctx = Context(1, node, {}, RecordDict(), {})
        out.append(mod(_train_msg(node), ctx, _trainer))
    return out


def test_plain_fedavg_error_says_wrap_in_compressed() -> None:
    replies = _compressed_replies()
    with pytest.raises(TypeError, match="Unsupported serialization type") as raw:
        FedAvg().aggregate_train(1, replies)  # what a user's ServerApp sees today
    err = missing_decoder_error(raw.value)
    assert isinstance(err, MissingDecoderError) and err.stype == "flwr-ext/fedzip"
    fix = "wrap the strategy in Compressed"
    with pytest.raises(MissingDecoderError, match=fix) as info, explain_missing_decoder():
        FedAvg().aggregate_train(1, replies)
    assert isinstance(info.value, TypeError)  # still what Flower raised, with the fix in it
    assert "'flwr-ext/fedzip'" in str(info.value) and HINT in str(info.value)
    with pytest.raises(MissingDecoderError, match="Compressed"):
        check_decodable(replies)


def test_other_errors_pass_through_and_wrapped_strategy_works() -> None:
    with pytest.raises(TypeError, match="^unrelated$"), explain_missing_decoder():
        raise TypeError("unrelated")
    assert missing_decoder_error(TypeError("Unsupported serialization type for numpy conversion: "
                                           "'numpy.ndarray'")) is None  # fmt: skip
    check_decodable([])
    check_decodable([_trainer(_train_msg(2), Context(1, 2, {}, RecordDict(), {}))])  # plain


def test_decoder_handshake_in_the_train_config() -> None:
    msg = _train_msg(1)
    assert not server_decodes(msg)
    announce_decoder(msg.content["config"])
    assert server_decodes(msg)
