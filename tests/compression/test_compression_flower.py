"""The client mod and the ``Compressed`` wrapper on Flower messages (no Ray: a fake grid)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
)

from flwr_ext.asyncfl.testing import NodeListGrid
from flwr_ext.compression import Compressed, compression_mod, decode_reply, is_compressed
from flwr_ext.compression.hints import DECODER_KEY

RNG = np.random.default_rng(3)


pytestmark = pytest.mark.usefixtures("task_identity")


GLOBAL = {
    "w": RNG.standard_normal((30, 20)).astype(np.float32),
    "b": RNG.standard_normal(20).astype(np.float32),
}


def _context(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _trainer(step: np.ndarray | None = None):
    """A ClientApp body: adds a fixed (per node) step to every received array."""

    def call_next(msg: Message, ctx: Context) -> Message:
        arrays = msg.content["arrays"]
        rng = np.random.default_rng(ctx.node_id)
        new = {
            k: v.numpy() + rng.standard_normal(v.shape).astype(np.float32) * 0.1
            for k, v in arrays.items()
        }
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in new.items()}),
                "metrics": MetricRecord({"num-examples": 10 + ctx.node_id}),
            }
        )
        return Message(content, reply_to=msg)

    return call_next


def _train_msg(arrays: dict[str, np.ndarray], node: int, rnd: int = 1) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"server-round": rnd, DECODER_KEY: True}),
        }
    )
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def test_mod_encodes_train_replies_and_server_recovers_them() -> None:
    mod = compression_mod("qsgd-8bit")
    msg = _train_msg(GLOBAL, node=5)
    ctx = _context(5)
    plain = _trainer()(msg, ctx)
    reply = mod(msg, ctx, _trainer())
    assert is_compressed(reply.content["arrays"])
    assert all(a.stype == "flwr-ext/qsgd-8bit" for a in reply.content["arrays"].values())
    assert reply.content["arrays"].count_bytes() < plain.content["arrays"].count_bytes() / 3
    assert reply.content["metrics"]["num-examples"] == 15  # metrics untouched
    decoded = decode_reply(reply.content, msg.content["arrays"])["arrays"]
    for k in GLOBAL:
        want = plain.content["arrays"][k].numpy()
        got = decoded[k].numpy()
        assert got.shape == want.shape and got.dtype == want.dtype
        # QSGD error per value <= bucket norm / s
        assert np.max(np.abs(got - want)) < 0.1 * np.sqrt(512) * 3 / 127 + 1e-3


def test_mod_passes_through_evaluate_errors_and_none() -> None:
    mod = compression_mod("fedzip")
    ctx = _context(1)
    ev = Message(
        RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    out = mod(ev, ctx, _trainer())
    assert not is_compressed(out.content["arrays"])
    msg = _train_msg(GLOBAL, 1)
    err = mod(msg, ctx, lambda m, c: Message(Error(code=1, reason="boom"), reply_to=m))
    assert err.has_error()
    out = compression_mod("none")(msg, ctx, _trainer())
    assert not is_compressed(out.content["arrays"])


def test_mod_keeps_error_feedback_residual_in_context_state() -> None:
    mod = compression_mod("fedzip")
    ctx = _context(2)
    msg = _train_msg(GLOBAL, 2)
    plain = _trainer()(msg, ctx)
    reply = mod(msg, ctx, _trainer())
    residual = ctx.state["flwr-ext.compression.residual"]
    decoded = decode_reply(reply.content, msg.content["arrays"])["arrays"]
    for k in GLOBAL:
        delta = plain.content["arrays"][k].numpy() - GLOBAL[k]
        sent = decoded[k].numpy() - GLOBAL[k]
        np.testing.assert_allclose(sent + residual[k].numpy(), delta, atol=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FedAvg(fraction_evaluate=0.0, min_available_nodes=3),
        lambda: FedAdam(fraction_evaluate=0.0, min_available_nodes=3),
        lambda: DifferentialPrivacyServerSideFixedClipping(
            FedAvg(fraction_evaluate=0.0, min_available_nodes=3),
            noise_multiplier=0.0,
            clipping_norm=1e6,
            num_sampled_clients=3,
        ),
    ],
    ids=["FedAvg", "FedAdam", "DP-fixed-clipping"],
)
def test_wrapper_matches_uncompressed_aggregation_and_drops_corrupt(make) -> None:
    """With a lossless preset the wrapped strategy's result equals the uncompressed one."""
    grid = NodeListGrid([1, 2, 3])
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    results = []
    for compressed in (False, True):
        strat = make()
        wrapper = Compressed(strat) if compressed else strat
        msgs = list(wrapper.configure_train(1, arrays, ConfigRecord(), grid))
        mod = compression_mod("sparse-lora", include=("w", "b"), density=1.0)
        replies = []
        for m in msgs:
            ctx = _context(m.metadata.dst_node_id)
            replies.append(mod(m, ctx, _trainer()) if compressed else _trainer()(m, ctx))
        replies.sort(key=lambda m: m.metadata.src_node_id)
        if compressed:  # node 3's payload is truncated: dropped, like node 3 missing
            bad = replies[2]
            arr = bad.content["arrays"]["w"]
            bad.content["arrays"]["w"] = Array(arr.dtype, arr.shape, arr.stype, arr.data[:-3])
        agg, metrics = wrapper.aggregate_train(1, replies if compressed else replies[:2])
        results.append(agg)
        if compressed:
            assert metrics["dropped-replies"] == 1
            assert metrics["uplink-bytes"] > 0 and metrics["downlink-bytes"] > 0
            assert metrics["uplink-bytes-cumulative"] == metrics["uplink-bytes"]
            assert len(wrapper.bytes.events) == 6
    for k in GLOBAL:
        np.testing.assert_allclose(results[0][k].numpy(), results[1][k].numpy(), atol=1e-6)


def test_wrapper_uses_per_node_reference_and_writes_csv(tmp_path) -> None:
    wrapper = Compressed(
        FedAvg(fraction_evaluate=0.0, min_available_nodes=2), csv_path=tmp_path / "b.csv"
    )
    grid = NodeListGrid([1, 2])
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(wrapper.configure_train(4, arrays, ConfigRecord(), grid))
    mod = compression_mod("dgc")
    replies = [mod(m, _context(m.metadata.dst_node_id), _trainer()) for m in msgs]
    agg, metrics = wrapper.aggregate_train(4, replies)
    assert agg is not None and metrics["dropped-replies"] == 0
    assert metrics["compression-ratio"] > 2
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0].startswith("server_round,node_id,direction,bytes,raw_bytes,status")
    assert len(lines) == 5


class _PerNodeArrays(FedAvg):
    """FedAvg that sends each node a different model (as async strategies do)."""

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        for m in msgs:  # FedAvg's messages share one RecordDict: give each its own
            node = m.metadata.dst_node_id
            shifted = {k: Array(v.numpy() + np.float32(10 * node)) for k, v in arrays.items()}
            m.content = RecordDict({"arrays": ArrayRecord(shifted), "config": m.content["config"]})
        return msgs


def test_wrapper_decodes_each_reply_against_the_arrays_its_node_was_sent(tmp_path) -> None:
    """Different arrays per node: each reply decodes to its own reference + its delta."""
    wrapper = Compressed(
        _PerNodeArrays(fraction_evaluate=0.0, min_available_nodes=3), csv_path=tmp_path / "b.csv"
    )
    grid = NodeListGrid([1, 2, 3])
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(wrapper.configure_train(2, arrays, ConfigRecord(), grid))
    sent = {m.metadata.dst_node_id: m.content["arrays"] for m in msgs}
    assert sent[1]["w"].numpy()[0, 0] != sent[2]["w"].numpy()[0, 0]
    mod = compression_mod("sparse-lora", include=("w", "b"), density=1.0)  # lossless
    plain, replies = {}, []
    for m in msgs:
        node = m.metadata.dst_node_id
        plain[node] = _trainer()(m, _context(node)).content["arrays"]
        replies.append(mod(m, _context(node), _trainer()))
    assert all(is_compressed(r.content["arrays"]) for r in replies)
    up_bytes = {r.metadata.src_node_id: r.content["arrays"].count_bytes() for r in replies}
    agg, metrics = wrapper.aggregate_train(2, replies)
    assert metrics["dropped-replies"] == 0
    for r in replies:  # decoded in place, each against its own node's arrays
        node = r.metadata.src_node_id
        for k in GLOBAL:
            np.testing.assert_allclose(
                r.content["arrays"][k].numpy(), plain[node][k].numpy(), atol=1e-6
            )
    weights = {n: 10 + n for n in (1, 2, 3)}
    for k in GLOBAL:
        want = sum(weights[n] * plain[n][k].numpy() for n in weights) / sum(weights.values())
        np.testing.assert_allclose(agg[k].numpy(), want, atol=1e-5)
    # the CSV has one row per message with the bytes that were actually on the wire
    import csv

    with (tmp_path / "b.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    ups = {int(r["node_id"]): int(r["bytes"]) for r in rows if r["direction"] == "up"}
    downs = [r for r in rows if r["direction"] == "down"]
    assert len(rows) == 6 and len(downs) == 3
    assert {int(r["server_round"]) for r in rows} == {2}
    assert all(r["status"] == "ok" for r in rows if r["direction"] == "up")
    for node, nbytes in ups.items():
        assert abs(nbytes - up_bytes[node]) <= 64  # the record plus the metrics record


def test_support_mean_averages_each_coordinate_over_its_senders() -> None:
    from flwr_ext.compression.server import support_mean

    d1 = {"w": np.array([2.0, 0.0, 4.0], np.float32), "b": np.array([1.0, 1.0], np.float32)}
    d2 = {"w": np.array([0.0, 6.0, 8.0], np.float32), "b": np.array([3.0, 0.0], np.float32)}
    out = support_mean([d1, d2], [{"w"}, {"w"}], [1.0, 3.0])
    mean = (1.0 * out[0]["w"] + 3.0 * out[1]["w"]) / 4.0
    # coordinate 0: only reply 1 sent it; 1: only reply 2; 2: both (weighted 1:3)
    np.testing.assert_allclose(mean, [2.0, 6.0, (4.0 + 3 * 8.0) / 4], rtol=1e-6)
    # dense tensors (not in the sparse sets) are left alone, even where a value is 0
    np.testing.assert_array_equal(out[1]["b"], d2["b"])


def test_wrapper_sparse_mean_option_and_dp_refusal() -> None:
    from flwr_ext.compression import ConfigError

    dp = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=0.0, clipping_norm=1.0, num_sampled_clients=2
    )
    with pytest.raises(ConfigError):
        Compressed(dp, sparse_mean=True)
    assert Compressed(dp).sparse_mean is False
    grid = NodeListGrid([1, 2])
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    aggs = []
    for sparse_mean in (False, True):
        wrapper = Compressed(
            FedAvg(fraction_evaluate=0.0, min_available_nodes=2), sparse_mean=sparse_mean
        )
        msgs = list(wrapper.configure_train(1, arrays, ConfigRecord(), grid))
        mod = compression_mod("dgc", density=0.05)
        replies = [mod(m, _context(m.metadata.dst_node_id), _trainer()) for m in msgs]
        agg, _ = wrapper.aggregate_train(1, replies)
        aggs.append(agg["w"].numpy() - GLOBAL["w"])
    plain, support = aggs
    # the two random top-5% selections barely overlap: the support mean is about twice as big
    ratio = np.abs(support).sum() / np.abs(plain).sum()
    assert 1.7 < ratio <= 2.0 + 1e-6


def test_mod_warmup_follows_the_clients_own_job_count() -> None:
    from flwr_ext.compression.presets import DGC_WARMUP

    mod = compression_mod("dgc", density=0.001, warmup=DGC_WARMUP)
    ctx = _context(5)
    kept = []
    for rnd in (40, 41, 42):  # async model versions: far past the schedule's length
        out = mod(_train_msg(GLOBAL, 5, rnd), ctx, _trainer())
        w = decode_reply(out.content, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}))
        kept.append(int(np.count_nonzero(w["arrays"]["w"].numpy() - GLOBAL["w"])))
    assert kept == [150, 38, 10]  # 25%, 6.25%, 1.5625% of 600


def test_mod_reads_the_preset_from_the_run_config() -> None:
    mod = compression_mod(None)
    for preset, compressed in (("fedzip", True), ("none", False), ("", False)):
        ctx = Context(
            run_id=1,
            node_id=3,
            node_config={},
            state=RecordDict(),
            run_config={"compression": preset},
        )
        out = mod(_train_msg(GLOBAL, 3), ctx, _trainer())
        assert is_compressed(out.content["arrays"]) is compressed
