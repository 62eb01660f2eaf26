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
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg

from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.compression import Compressed, compression_mod
from flwr_ext.compression.hints import (
    DECODER_KEY,
    HINT,
    MissingDecoderError,
    announce,
    announce_decoder,
    check_decodable,
    compressed_stype,
    explain_missing_decoder,
    missing_decoder_error,
    server_decodes,
)
from flwr_ext.strategies import FedBuff

pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = {"w": np.zeros((20, 10), np.float32), "b": np.zeros(10, np.float32)}


def _train_msg(node: int, announced: bool = True) -> Message:
    """A train message; ``announced``: as sent by a decoder (Compressed, the async engine)."""
    config = ConfigRecord({"server-round": 1})
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}),
            "config": announce_decoder(config) if announced else config,
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
    msg = _train_msg(1, announced=False)
    assert not server_decodes(msg)
    announce_decoder(msg.content["config"])
    assert server_decodes(msg)
    bare = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    assert server_decodes(announce(bare))  # a message without a config record gets one


def test_mod_refuses_to_compress_for_a_server_that_does_not_decode() -> None:
    """Plain FedAvg (no wrapper) sends no DECODER_KEY: an error reply that says what to do."""
    calls = []

    def trainer(msg: Message, ctx: Context) -> Message:
        calls.append(msg)
        return _trainer(msg, ctx)

    mod = compression_mod("fedzip")
    reply = mod(_train_msg(3, announced=False), Context(1, 3, {}, RecordDict(), {}), trainer)
    assert reply.has_error() and calls == []  # no local work spent on an unreadable reply
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert reply.error.reason == HINT and "wrap the strategy in Compressed" in HINT
    # Flower's FedAvg skips the error reply (it logs the reason) instead of raising TypeError
    arrays, _ = FedAvg().aggregate_train(1, [reply])
    assert arrays is None
    # compression="none" never refuses, and an announcing server gets compressed replies
    plain = compression_mod("none")(
        _train_msg(3, False), Context(1, 3, {}, RecordDict(), {}), trainer
    )
    assert not plain.has_error() and len(calls) == 1
    assert compressed_stype(_compressed_replies()[0]) == "flwr-ext/fedzip"


def test_every_decoder_announces_itself() -> None:
    """Compressed(FedAvg) and the async engine put DECODER_KEY in every train message."""
    seen: list[bool] = []

    def client(pid: int, msg: Message) -> RecordDict:
        seen.append(server_decodes(msg))
        return _trainer(msg, Context(1, pid, {}, RecordDict(), {})).content

    grid = FakeGrid(client, num_nodes=2)
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    fedavg = FedAvg(min_available_nodes=2)
    msgs = list(Compressed(fedavg).configure_train(1, arrays, ConfigRecord(), grid))
    assert len(msgs) == 2 and all(server_decodes(m) for m in msgs)
    plain = list(FedAvg(min_available_nodes=2).configure_train(1, arrays, ConfigRecord(), grid))
    assert not any(server_decodes(m) for m in plain)
    FedBuff(buffer_size=1).start(grid, arrays, num_rounds=3, timeout=30)
    assert len(seen) >= 3 and all(seen)  # every job the engine sent announced it
    assert DECODER_KEY in msgs[0].content["config"]
