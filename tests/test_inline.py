"""The inline backend (``flwr_ext.inline``) without Ray: what a ClientApp sees, errors, clocks.

The equality with Flower's Simulation Engine is tested in ``test_inline_equivalence.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

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
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from flwr_ext.asyncfl import DeviceProfile, RealClock, VirtualClock
from flwr_ext.inline import InlineGrid, RealClockRefused, run_inline
from flwr_ext.sim import (
    ServerAppFailed,
    fused_run_config,
    load_components,
    run_app,
    simulation_backend_config,
    simulation_concurrency,
)
from flwr_ext.strategies import FedAsync

ROOT = Path(__file__).resolve().parents[1]


def _counting_client() -> ClientApp:
    """Counts its calls in ``context.state``; raises (after counting) if the config has ``fail``."""

    def tag(msg: Message, ctx: Context, call_next) -> Message:  # a mod: runs around the app
        reply = call_next(msg, ctx)
        if not reply.has_error():
            reply.content["metrics"]["mod-saw"] = 1
        return reply

    app = ClientApp(mods=[tag])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        rec = ctx.state.get("count", ConfigRecord({"n": 0}))
        rec["n"] = int(rec["n"]) + 1
        ctx.state["count"] = rec
        if "fail" in msg.content.get("config", ConfigRecord()):
            raise RuntimeError(f"boom at call {rec['n']}")
        arrays = msg.content["arrays"]
        # mutate the received record in place: must never reach the server's object
        arrays["w"] = Array(np.full(3, float(rec["n"]), np.float32))
        metrics = MetricRecord(
            {
                "n": rec["n"],
                "partition-id": int(ctx.node_config["partition-id"]),
                "num-partitions": int(ctx.node_config["num-partitions"]),
                "num-examples": 1,
                "rc": float(ctx.run_config["x"]),
            }
        )
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _send(grid: Grid, node: int, arrays: ArrayRecord, fail: bool = False) -> Message:
    config = ConfigRecord({"server-round": 0, **({"fail": 1} if fail else {})})
    msg = Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=node,
        message_type=MessageType.TRAIN,
    )
    (reply,) = grid.send_and_receive([msg])
    return reply


def test_context_state_persists_per_node_and_node_config():
    grid = InlineGrid(_counting_client(), 3, {"x": 2.5}, node_id_seed=1)
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    seen = {}
    for _ in range(2):
        for nid in grid.get_node_ids():
            reply = _send(grid, nid, arrays)
            m = reply.content["metrics"]
            seen.setdefault(int(m["partition-id"]), []).append(int(m["n"]))
            assert m["num-partitions"] == 3 and m["rc"] == 2.5 and m["mod-saw"] == 1
    assert seen == {0: [1, 2], 1: [1, 2], 2: [1, 2]}  # state kept per node
    assert np.array_equal(arrays["w"].numpy(), np.zeros(3))  # the server's record untouched
    assert grid.stats.messages == 6 and grid.stats.errors == 0


def test_failed_call_is_an_error_reply_and_keeps_the_previous_state():
    grid = InlineGrid(_counting_client(), 1, {"x": 0.0})
    (nid,) = grid.get_node_ids()
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    assert _send(grid, nid, arrays).content["metrics"]["n"] == 1
    err = _send(grid, nid, arrays, fail=True)
    assert err.has_error() and err.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert "ClientAppException" in err.error.reason and "boom at call 2" in err.error.reason
    # as in the Simulation Engine, the failed call's Context is dropped: the count is 1 again
    assert _send(grid, nid, arrays).content["metrics"]["n"] == 2


def test_messages_of_a_node_run_in_push_order():
    grid = InlineGrid(_counting_client(), 1, {"x": 0.0})
    (nid,) = grid.get_node_ids()
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    msgs = [
        Message(
            RecordDict({"arrays": arrays, "config": ConfigRecord({})}),
            dst_node_id=nid,
            message_type=MessageType.TRAIN,
        )
        for _ in range(3)
    ]
    first, _, last = grid.push_messages(msgs)
    # pulling the last one first runs the two before it (their replies wait to be pulled)
    (r_last,) = grid.pull_messages([last])
    (r_first,) = grid.pull_messages([first])
    assert r_last.content["metrics"]["n"] == 3 and r_first.content["metrics"]["n"] == 1
    assert (
        grid.push_messages(
            [
                Message(
                    RecordDict({"arrays": arrays}),
                    dst_node_id=12345,
                    message_type=MessageType.TRAIN,
                )
            ]
        )
        == []
    ), "a message to an unknown node is not accepted"


def test_node_ids_random_per_run_unless_seeded():
    a = InlineGrid(_counting_client(), 4, {}).get_node_ids()
    b = InlineGrid(_counting_client(), 4, {}).get_node_ids()
    assert a != b
    c = InlineGrid(_counting_client(), 4, {}, node_id_seed=7).get_node_ids()
    assert c == InlineGrid(_counting_client(), 4, {}, node_id_seed=7).get_node_ids()


def test_flower_fedavg_runs_on_the_inline_grid():
    grid = InlineGrid(_counting_client(), 3, {"x": 1.0})
    result = FedAvg(fraction_evaluate=0.0, min_available_nodes=3).start(
        grid=grid,
        initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
        num_rounds=2,
    )
    # round r: every node replies w = r (its call count), FedAvg's mean is r
    assert np.array_equal(result.arrays["w"].numpy(), np.full(3, 2.0, np.float32))


def _async_server(clock) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        FedAsync(alpha=0.5).start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
            num_rounds=3,
            clock=clock,
            min_nodes=2,
            poll_interval=0.0,
        )

    return app


def test_async_engine_on_virtual_clock_runs_inline():
    grid = run_inline(
        _async_server(VirtualClock(DeviceProfile("exponential"), seed=0)),
        _counting_client(),
        num_supernodes=2,
        run_config={"x": 0.0, "clock": "virtual"},
    )
    assert grid.stats.messages >= 3


def test_real_clock_is_refused_with_a_clear_message():
    with pytest.raises(RealClockRefused, match="clock='virtual'"):
        run_inline(
            ServerApp(),
            _counting_client(),
            num_supernodes=2,
            run_config={"clock": "real"},
        )
    # a ServerApp that builds a RealClock itself (no run-config key) is caught at the first push
    with pytest.raises(RealClockRefused, match="backend='simulation'"):
        run_app(
            _async_server(RealClock()),
            _counting_client(),
            num_supernodes=2,
            run_config={"x": 0.0},
            backend="inline",
        )


def _failing_server(exc: BaseException) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raise exc

    return app


@pytest.mark.parametrize("exc", [ValueError("bad key"), SystemExit(3)])
def test_run_app_raises_when_the_serverapp_raised(exc):
    with pytest.raises(ServerAppFailed) as info:
        run_app(
            _failing_server(exc),
            _counting_client(),
            num_supernodes=1,
            run_config={},
            backend="inline",
        )
    assert info.value.__cause__ is exc


def test_cli_demo_fails_when_the_serverapp_fails(monkeypatch, tmp_path):
    import flwr_ext.demo as demo
    from flwr_ext.cli import main

    monkeypatch.setattr(
        demo, "app_components", lambda: (_failing_server(ValueError("x")), _counting_client())
    )
    # an uncaught exception: the flwr-ext process exits with status 1
    with pytest.raises(ServerAppFailed):
        main(["demo", "--quick", "--no-engine-check", "--out", str(tmp_path)])


def test_load_components_from_the_app_folder():
    server_app, client_app = load_components(ROOT / "apps" / "async-vision")
    assert isinstance(server_app, ServerApp) and isinstance(client_app, ClientApp)
    cfg = fused_run_config(ROOT / "apps" / "async-vision")
    assert cfg["clock"] == "virtual"


def test_library_never_imports_an_app():
    apps = {p.parent.name for p in (ROOT / "apps").glob("*/*/__init__.py")}
    apps |= {p.parent.name for p in (ROOT / "bench" / "apps").glob("*/*/__init__.py")}
    assert "async_vision" in apps
    offenders = []
    for path in (ROOT / "flwr_ext").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in apps]
    assert not offenders, offenders


def test_simulation_concurrency_rule_and_max_concurrent():
    import os

    cap = min(32, (os.cpu_count() or 1) + 4)
    assert simulation_concurrency(0.01) == cap  # many actors, the thread pool caps them
    assert simulation_concurrency(1.0, ray_cpus=2) == min(2, cap)
    cfg = simulation_backend_config(max_concurrent=min(3, cap))
    assert cfg["client_resources"]["num_cpus"] == 1
    assert cfg["init_args"]["num_cpus"] == min(3, cap)
    with pytest.raises(ValueError, match="cpu_count"):
        simulation_backend_config(max_concurrent=cap + 1)


def test_worker_pool_keeps_state_order_and_errors():
    grid = InlineGrid(_counting_client(), 3, {"x": 1.0}, workers=2)
    try:
        arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
        nodes = list(grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({})}),
                dst_node_id=nid,
                message_type=MessageType.TRAIN,
            )
            for nid in nodes + nodes  # two messages per node, pushed at once
        ]
        replies = grid.send_and_receive(msgs)
        counts = sorted(
            (int(r.content["metrics"]["partition-id"]), int(r.content["metrics"]["n"]))
            for r in replies
        )
        assert counts == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
        err = _send(grid, nodes[0], arrays, fail=True)
        assert err.has_error() and "boom at call 3" in err.error.reason
        assert _send(grid, nodes[0], arrays).content["metrics"]["n"] == 3  # failed call dropped
        assert grid.stats.messages == 8 and grid.stats.errors == 1
    finally:
        grid.close()


def test_worker_pool_runs_flower_fedavg():
    grid = InlineGrid(_counting_client(), 3, {"x": 1.0}, workers=2)
    try:
        result = FedAvg(fraction_evaluate=0.0, min_available_nodes=3).start(
            grid=grid,
            initial_arrays=ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
            num_rounds=2,
        )
    finally:
        grid.close()
    assert np.array_equal(result.arrays["w"].numpy(), np.full(3, 2.0, np.float32))
