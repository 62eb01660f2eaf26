"""EF21-P downlink through ``Compressed`` + ``compression_mod``: shadows, re-syncs, contract.

Flower's ``FedAvg`` and the client mod on real ``flwr.app.Message`` objects, driven round by
round in-process, with lost messages, lost replies, lost node state and a late-joining node.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from flwr_ext.asyncfl.testing import NodeListGrid
from flwr_ext.compression import Compressed, compression_mod
from flwr_ext.compression.codec import PipelineConfig, decode_tensor
from flwr_ext.compression.downlink import (
    KEY_CHECKSUM,
    KEY_FROM,
    KEY_VERSION,
    DownlinkState,
    NodeCopy,
    Refusal,
    Send,
    downlink_config,
    load_copy,
    node_receive,
    save_copy,
    server_confirm,
    server_send,
)
from flwr_ext.compression.server import MissingDownlinkModError

pytestmark = pytest.mark.usefixtures("task_identity")


INIT = {
    "w": np.random.default_rng(0).standard_normal((40, 30)).astype(np.float32),
    "b": np.zeros(30, np.float32),
}
TARGETS = {
    n: {
        k: np.random.default_rng(10 + n).standard_normal(v.shape).astype(np.float32)
        for k, v in INIT.items()
    }
    for n in range(1, 8)
}
DENSE_BYTES = ArrayRecord({k: Array(v) for k, v in INIT.items()}).count_bytes()


def _ctx(node: int) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def _trainer(node: int, seen: list):
    """One gradient step of 0.5 ||x - target||^2 (lr 0.3); records the arrays it was given."""

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


def _run(
    wrapper: Compressed,
    rounds: int,
    mod,
    *,
    nodes=(1, 2, 3, 4),
    join: dict[int, int] | None = None,
    lose_msg=(),
    lose_reply=(),
    reset=(),
    ctxs: dict[int, Context] | None = None,
):
    """Drive ``wrapper`` for ``rounds``; checks every round that each ClientApp trained from
    exactly the server's shadow of that node. Returns arrays, contexts, metrics per round."""
    join = join or {}
    ctxs = ctxs if ctxs is not None else {}
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    history = []
    for rnd in range(1, rounds + 1):
        present = [n for n in nodes if join.get(n, 1) <= rnd]
        for n in present:
            ctxs.setdefault(n, _ctx(n))
        for r, n in reset:
            if r == rnd:
                ctxs[n] = _ctx(n)  # the node lost its context.state
        replies = []
        for m in wrapper.configure_train(rnd, arrays, ConfigRecord(), NodeListGrid(present)):
            node = m.metadata.dst_node_id
            if (rnd, node) in lose_msg:
                continue
            seen: list = []
            reply = mod(m, ctxs[node], _trainer(node, seen))
            if seen and wrapper.downlink is not None:
                shadow = wrapper.downlink.nodes[node].arrays
                for k in INIT:  # the ClientApp trained from the shadow, bit for bit
                    assert seen[0][1][k].tobytes() == shadow[k].tobytes(), (rnd, node, k)
            if (rnd, node) not in lose_reply:
                replies.append(reply)
        new, metrics = wrapper.aggregate_train(rnd, replies)
        arrays = new if new is not None else arrays
        history.append(metrics)
    return arrays, ctxs, history


def _fedavg(nodes: int, fraction: float = 1.0) -> FedAvg:
    return FedAvg(
        fraction_train=fraction,
        fraction_evaluate=0.0,
        min_available_nodes=1,
        min_train_nodes=max(1, int(nodes * fraction)),
    )


# --------------------------------------------------------------------------- by hand
def test_downlink_config_drops_residual_feedback_momentum_and_warmup() -> None:
    cfg = downlink_config("dgc:density=0.01")
    assert cfg is not None
    assert not cfg.error_feedback and cfg.momentum == 0 and cfg.warmup == ()
    assert cfg.density == 0.01 and cfg.sparsify == "topk"
    assert downlink_config("none") is None and downlink_config(None) is None


def test_one_step_by_hand_top1() -> None:
    """w <- w + C(x - w) with C = top-1 (exact values), on both sides."""
    cfg = PipelineConfig(name="custom", sparsify="topk", density=0.25)
    state = DownlinkState(cfg)
    x0 = {"v": np.array([1.0, 2.0, 3.0, 4.0], np.float32)}
    first = server_send(state, 7, x0)
    assert first.kind == Send.NEW and first.config[KEY_FROM] == -1
    copy = NodeCopy()
    assert node_receive(copy, first.config, first.record) is None
    assert server_confirm(state, 7, copy.version)
    x1 = {"v": np.array([1.0, 2.5, 3.0, 0.0], np.float32)}
    inc = server_send(state, 7, x1)
    assert inc.kind == Send.COMPRESSED and inc.config[KEY_FROM] == 1
    # x - w = [0, .5, 0, -4]: top-1 keeps -4
    d = decode_tensor(inc.record["v"].data, stype=inc.record["v"].stype)
    np.testing.assert_array_equal(d, [0, 0, 0, -4])
    np.testing.assert_array_equal(inc.shadow["v"], [1.0, 2.0, 3.0, 0.0])
    assert node_receive(copy, inc.config, inc.record) is None
    assert copy.arrays["v"].tobytes() == inc.shadow["v"].tobytes()
    assert copy.version == inc.config[KEY_VERSION] == 2
    # what top-1 left out (the 0.5) is sent next time: the shadow is the error feedback
    server_confirm(state, 7, 2)
    nxt = server_send(state, 7, x1)
    np.testing.assert_array_equal(nxt.shadow["v"], x1["v"])


def test_node_refuses_a_wrong_base_or_checksum_and_forgets_its_shadow() -> None:
    cfg = PipelineConfig(name="custom", sparsify="topk", density=0.5)
    state = DownlinkState(cfg)
    x = {"v": np.arange(6, dtype=np.float32)}
    first = server_send(state, 1, x)
    copy = NodeCopy()
    node_receive(copy, first.config, first.record)
    server_confirm(state, 1, copy.version)
    inc = server_send(state, 1, {"v": x["v"] * 2})
    assert node_receive(NodeCopy(), inc.config, inc.record) == Refusal.NO_STATE
    bad = dict(inc.config)
    bad[KEY_CHECKSUM] = "0" * 16
    tampered = NodeCopy({"v": copy.arrays["v"].copy()}, copy.version)
    assert node_receive(tampered, bad, inc.record) == Refusal.CHECKSUM
    assert tampered.version == -1 and not tampered.arrays


# --------------------------------------------------------------------------- through Flower
def test_shadows_identical_on_both_sides_after_many_rounds_with_losses_and_a_late_node() -> None:
    random.seed(3)  # FedAvg's node sampling
    wrapper = Compressed(_fedavg(5, 0.8), downlink="fedzip:density=0.05")
    rounds = 40
    _, ctxs, history = _run(
        wrapper,
        rounds,
        compression_mod("fedzip"),
        nodes=(1, 2, 3, 4, 5),
        join={5: 12},  # joins late
        lose_msg={(6, 2), (20, 3)},  # the instruction never arrives
        lose_reply={(9, 1), (25, 4)},  # the node applied and trained; the reply is lost
        reset={(15, 3), (30, 5)},  # the node restarts with an empty context.state
    )
    counts = wrapper.downlink.counts
    assert counts[Send.NEW] == 5  # four at round 1, node 5 at its first round
    assert counts[Send.UNCONFIRMED] >= 4  # every loss above costs one dense send
    assert counts[Send.COMPRESSED] > 100
    assert sum(m["downlink-resynced"] for m in history) == counts[Send.UNCONFIRMED]
    # the two resets were noticed by the node (error reply, not trained) and re-synced
    compared = 0
    for node, ctx in ctxs.items():
        copy = load_copy(ctx.state)
        shadow = wrapper.downlink.nodes[node]
        assert copy.version == shadow.version, node  # nothing lost after round 30
        for k in INIT:
            assert copy.arrays[k].tobytes() == shadow.arrays[k].tobytes(), (node, k)
        compared += 1
    assert compared == 5
    # compressed after the first contact: per-node downlink well under the dense model
    late = [m["downlink-bytes-per-node"] for m in history[31:]]
    assert max(late) < DENSE_BYTES / 10, late
    # one byte counter: the wrapper's down events sum to its cumulative downlink
    downs = [e for e in wrapper.bytes.events if e.direction == "down"]
    assert sum(e.bytes for e in downs) == wrapper.bytes.downlink_total
    assert history[-1]["downlink-bytes-cumulative"] == wrapper.bytes.downlink_total


def test_a_node_that_lost_its_state_answers_with_an_error_then_gets_the_dense_model() -> None:
    wrapper = Compressed(_fedavg(2), downlink="fedzip")
    mod = compression_mod("none")
    _, ctxs, _ = _run(wrapper, 3, mod, nodes=(1, 2))
    ctxs[1] = _ctx(1)
    _, _, history = _run(wrapper, 2, mod, nodes=(1, 2), ctxs=ctxs)
    # round "1" of the second call: node 1 refuses the increment (error reply), node 2 trains
    assert history[0]["downlink-compressed"] == 2 and history[0]["downlink-resynced"] == 0
    assert history[1]["downlink-resynced"] == 1 and history[1]["downlink-compressed"] == 1


def test_reply_is_rebased_onto_x_for_the_wrapped_strategy() -> None:
    """With an uncompressed uplink, FedAvg gets x + (y - w): EF21-P's step at x."""
    wrapper = Compressed(_fedavg(1), downlink="dgc:density=0.1")
    ctx = _ctx(1)
    mod = compression_mod("none")
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    x = {k: v + 1.0 for k, v in INIT.items()}
    for rnd, target in ((1, INIT), (2, x)):
        rec = ArrayRecord({k: Array(v) for k, v in target.items()})
        msgs = list(wrapper.configure_train(rnd, rec, ConfigRecord(), NodeListGrid([1])))
        seen: list = []
        reply = mod(msgs[0], ctx, _trainer(1, seen))
        w = seen[0][1]
        y = {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}
        arrays, _ = wrapper.aggregate_train(rnd, [reply])
    assert not np.array_equal(w["w"], x["w"])  # round 2 trained from a compressed shadow
    for k in INIT:
        np.testing.assert_allclose(arrays[k].numpy(), x[k] + (y[k] - w[k]), rtol=0, atol=1e-6)


def test_plain_client_app_without_the_mod_is_refused_with_a_clear_error() -> None:
    wrapper = Compressed(_fedavg(2), downlink="fedzip")
    no_mod = lambda m, c, f: f(m, c)  # noqa: E731
    with pytest.raises(MissingDownlinkModError, match="compression_mod"):
        _run(wrapper, 1, no_mod, nodes=(1, 2))


def test_plain_client_app_works_when_downlink_compression_is_off() -> None:
    wrapper = Compressed(_fedavg(2))
    no_mod = lambda m, c, f: f(m, c)  # noqa: E731
    arrays = ArrayRecord({k: Array(v) for k, v in INIT.items()})
    msgs = list(wrapper.configure_train(1, arrays, ConfigRecord(), NodeListGrid([1, 2])))
    for m in msgs:  # Flower's message contract: the dense model, no downlink keys
        assert set(m.content["arrays"]) == set(INIT)
        assert all(a.stype == "numpy.ndarray" for a in m.content["arrays"].values())
        assert KEY_VERSION not in m.content["config"]
    _, _, history = _run(wrapper, 3, no_mod, nodes=(1, 2))
    assert "downlink-compressed" not in history[-1]
    assert history[-1]["downlink-bytes"] == 2 * DENSE_BYTES


def test_downlink_with_compressed_uplink_sends_far_fewer_bytes_both_ways() -> None:
    wrapper = Compressed(_fedavg(4), downlink="fedzip")
    _, _, history = _run(wrapper, 6, compression_mod("fedzip"))
    assert history[0]["downlink-new"] == 4
    assert history[0]["downlink-bytes-per-node"] >= DENSE_BYTES
    for m in history[1:]:
        assert m["downlink-compressed"] == 4
        assert m["downlink-bytes-per-node"] < DENSE_BYTES / 10
        assert m["uplink-bytes-per-update"] < DENSE_BYTES / 10


def test_known_initial_model_makes_the_first_round_compressed_and_is_checked() -> None:
    wrapper = Compressed(_fedavg(2), downlink="fedzip", downlink_initial="known")
    good = compression_mod("none", initial=lambda ctx: INIT)
    ctxs = {1: _ctx(1), 2: _ctx(2)}
    _, _, history = _run(wrapper, 2, good, nodes=(1, 2), ctxs=ctxs)
    assert history[0]["downlink-compressed"] == 2 and history[0]["downlink-new"] == 0
    assert history[0]["downlink-bytes-per-node"] < DENSE_BYTES / 10
    # a node whose x_0 differs refuses (checksum), then gets the dense model
    wrapper = Compressed(_fedavg(2), downlink="fedzip", downlink_initial="known")
    wrong = {k: v + 1 for k, v in INIT.items()}
    bad = compression_mod("none", initial=lambda ctx: wrong if ctx.node_id == 2 else INIT)
    _, ctxs, history = _run(wrapper, 3, bad, nodes=(1, 2))
    assert history[0]["downlink-compressed"] == 2
    assert history[1]["downlink-resynced"] == 1
    for node, ctx in ctxs.items():
        copy = load_copy(ctx.state)
        assert copy.arrays["w"].tobytes() == wrapper.downlink.nodes[node].arrays["w"].tobytes()


def test_state_round_trip() -> None:
    state = RecordDict()
    copy = NodeCopy({"a": np.arange(3, dtype=np.float32)}, 4)
    save_copy(state, copy)
    back = load_copy(state)
    assert back.version == 4 and back.arrays["a"].tobytes() == copy.arrays["a"].tobytes()
    assert load_copy(RecordDict()).version == -1


def test_async_strategies_get_the_setting_handed_to_their_engine() -> None:
    from flwr_ext.compression.errors import ConfigError
    from flwr_ext.strategies import FedAsync

    wrapped = Compressed(FedAsync(), downlink="fedzip", downlink_seed=3)
    assert wrapped.downlink is None  # the engine keeps the shadows (tests/asyncfl)
    assert wrapped.engine_options["downlink"].density == 0.02
    assert wrapped.engine_options["downlink_seed"] == 3
    assert Compressed(FedAsync()).engine_options == {}
    with pytest.raises(ConfigError, match="asynchronous"):
        Compressed(FedAsync(), downlink="fedzip", downlink_initial="known")


# --------------------------------------------------------------------------- the app's key
def _app_cfg(**overrides):
    from pathlib import Path

    from flwr_ext.sim import fused_run_config

    app = Path(__file__).resolve().parents[2] / "apps" / "async-vision"
    return fused_run_config(app, overrides)


def test_async_vision_compression_down_key_wraps_flower_strategies_and_hands_async_ones_on():
    from async_vision.server_app import _build
    from async_vision.settings import validate

    from flwr_ext.settings import SettingError

    cfg = validate(_app_cfg(strategy="fedavg", **{"compression-down": "fedzip"}))
    _, strategy, _ = _build(cfg)
    assert isinstance(strategy, Compressed) and strategy.downlink is not None
    assert strategy.downlink.config.density == 0.02  # the fedzip preset, residual EF off
    _, plain, _ = _build(validate(_app_cfg(strategy="fedavg")))
    assert not isinstance(plain, Compressed)  # both keys 'none': Flower's FedAvg as it is
    _, fedasync, kwargs = _build(
        validate(_app_cfg(strategy="fedasync", **{"compression-down": "fedzip"}))
    )
    assert not isinstance(fedasync, Compressed) and kwargs["downlink"] == "fedzip"
    _, _, plain_kwargs = _build(validate(_app_cfg(strategy="fedasync")))
    assert "downlink" not in plain_kwargs
    with pytest.raises(SettingError):
        validate(_app_cfg(strategy="fedavg", **{"compression-down": "nosuchpreset"}))


@pytest.mark.slow  # Ray start-up + DigitsCNN training: 16 s here
@pytest.mark.timeout(300)
def test_async_vision_trains_with_compression_both_ways_through_the_simulation_engine(tmp_path):
    import json

    from async_vision.client_app import app as client_app
    from async_vision.server_app import app as server_app

    from flwr_ext.sim import run_app

    cfg = _app_cfg(
        strategy="fedavg",
        compression="fedzip",
        partitioner="iid",
        **{"compression-down": "fedzip", "num-server-rounds": 4, "output-dir": str(tmp_path)},
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg, num_cpus_per_client=1)
    res = json.loads((tmp_path / "fedavg.json").read_text())
    train = res["train_metrics_clientapp"]
    acc = res["evaluate_metrics_serverapp"]
    assert acc["4"]["accuracy"] > acc["0"]["accuracy"] + 0.3
    assert train["1"]["downlink-new"] == 3
    for r in ("2", "3", "4"):
        assert train[r]["downlink-compressed"] == 3 and train[r]["downlink-resynced"] == 0
        assert train[r]["downlink-bytes-per-node"] < DENSE_CNN_BYTES / 50
        assert train[r]["uplink-bytes-per-update"] < DENSE_CNN_BYTES / 50


DENSE_CNN_BYTES = 154_288  # count_bytes() of the float32 DigitsCNN ArrayRecord


@pytest.mark.timeout(300)
def test_async_vision_fedbuff_with_compression_down_inline_virtual_clock(tmp_path):
    """The app's ``compression-down`` key on FedBuff, inline backend (no Ray), virtual clock."""
    import json

    from async_vision.client_app import app as client_app
    from async_vision.server_app import app as server_app

    from flwr_ext.sim import run_app

    cfg = _app_cfg(
        strategy="fedbuff",
        compression="fedzip",
        partitioner="iid",
        **{
            "compression-down": "fedzip",
            "num-server-rounds": 6,
            "buffer-size": 2,
            "clock": "virtual",
            "output-dir": str(tmp_path),
        },
    )
    run_app(server_app, client_app, num_supernodes=3, run_config=cfg, backend="inline")
    info = json.loads((tmp_path / "fedbuff-counters.json").read_text())
    c = info["counters"]
    assert c["versions"] == 6 and c["updates-rejected"] == 0 and c["error-replies"] == 0
    assert c["downlink-new"] == 3 and c["downlink-resynced"] == 0
    assert c["downlink-compressed"] == c["jobs-dispatched"] - 3
    dense_total = c["jobs-dispatched"] * DENSE_CNN_BYTES
    assert c["downlink-bytes"] < 3 * DENSE_CNN_BYTES + dense_total / 20


def test_zero_dim_tensors_keep_their_shape_in_shadows_and_client_state() -> None:
    """``Array(np.ascontiguousarray(v))`` turned a 0-d tensor into shape (1,): a shadow or a
    residual saved that way no longer matched the model's shape on the next round."""
    from flwr.app import Context, RecordDict

    from flwr_ext.compression import downlink, mod

    scalar = {"s": np.asarray(np.float32(1.5)), "w": np.ones((2, 3), np.float32)}
    assert downlink._record(scalar)["s"].numpy().shape == ()
    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    mod._save(ctx, "x", scalar)
    back = mod._load(ctx, "x")
    assert back["s"].shape == () and back["s"] == np.float32(1.5)
    assert back["w"].flags.writeable  # residuals are updated in place
