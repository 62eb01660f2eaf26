"""SFPrompt's message protocol on an in-process Grid: what reaches the server, timeouts, averaging.

``LoopbackGrid`` delivers every message to the real sfprompt-llm ClientApp in this process (one
Context per node, kept across messages as a SuperNode keeps it) and records every message in both
directions, so the tests can inspect exactly what the server receives.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

APP = Path(__file__).resolve().parents[2] / "apps" / "sfprompt-llm"
sys.path.insert(0, str(APP))

from flwr.clientapp import ClientApp  # noqa: E402
from sfprompt_llm.client_app import app, get_client  # noqa: E402
from sfprompt_llm.config import build_split  # noqa: E402

from flwr_ext.llm.data import ResponseOnlyCollator  # noqa: E402
from flwr_ext.llm.sfprompt import FINISH, PARAMS  # noqa: E402
from flwr_ext.llm.sfprompt_server import SFPromptServer  # noqa: E402
from flwr_ext.sim import fused_run_config  # noqa: E402

CFG = {
    "num-train-examples": 60,
    "num-eval-examples": 8,
    "batch-size": 4,
    "num-virtual-tokens": 4,
    "tail-mode": "full",
    "learning-rate": 0.01,
}


@pytest.fixture(autouse=True)
def _server_identity():
    """Message() needs the run identity a real ServerApp process has; restore it afterwards."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


class Hooked(ClientApp):
    """The app, with ``hook(action, message, context)`` run before each handler."""

    def __init__(self, hook: Callable[[str, Message, Context], None]) -> None:
        super().__init__()
        self.hook = hook

    def __call__(self, msg: Message, context: Context) -> Message:
        self.hook(msg.metadata.message_type.removeprefix("train."), msg, context)
        return app(msg, context)


class LoopbackGrid(Grid):
    """A Grid that runs ``app`` in-process.

    When ``silent(node, message_type, round)`` is true the client still runs but its reply is
    only released ``late`` seconds later (never, if ``late`` is None): a slow or vanished client.
    """

    def __init__(
        self,
        app,
        num_nodes: int,
        run_config: dict,
        silent: Callable[[int, str, int], bool] = lambda n, t, r: False,
        late: float | None = None,
    ) -> None:
        self.app = app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i in range(num_nodes)
        }
        self.silent = silent
        self.late = late
        self._release: dict[str, float] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []  # every reply, whether pulled or not
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            self.sent.append(msg)
            node, mtype = msg.metadata.dst_node_id, msg.metadata.message_type
            silent = self.silent(node, mtype, int(msg.metadata.group_id))
            if silent and self.late is None:
                continue
            if silent:
                self._release[mid] = time.monotonic() + self.late
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as err:  # noqa: BLE001 - a ClientApp exception becomes an error reply
                reply = Message(Error(code=1, reason=repr(err)), reply_to=msg)
            self.received.append(reply)
            self._replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        ready = [m for m in message_ids if m in self._replies and self._release.get(m, 0) <= now]
        return [self._replies.pop(m) for m in ready]

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover - not used
        return self.pull_messages(self.push_messages(messages))


def _server(cfg, **kw):
    split, _ = build_split(cfg)
    defaults = {"split_steps": 3, "local_steps": 2, "lr": 0.01, "timeout": 0.3, "min_nodes": 2}
    return SFPromptServer(split, **{**defaults, **kw})


def test_labels_and_loss_never_reach_the_server():
    cfg = fused_run_config(APP, CFG)
    grid = LoopbackGrid(app, 2, cfg)
    server = _server(cfg)
    history = server.run(grid, 2)
    assert [r["finished"] for r in history] == [2, 2]

    # what the clients hold: inputs, labels, and their own loss history
    secrets_int, losses = [], []
    for ctx in grid.contexts.values():
        client = get_client(cfg, ctx)
        batch = ResponseOnlyCollator(client.pad_token_id)(client.examples)
        secrets_int += [batch["labels"], batch["input_ids"]]
        split_losses, local_losses = client.local_losses(ctx)
        assert len(split_losses) == 2 * 3 and len(local_losses) == 2 * 2  # they did train
        losses += split_losses + local_losses

    allowed = {"acts": {"hidden", "mask"}, "grad": {"grad"}, "arrays": None, "metrics": None}
    trainable = set(server.state)
    n_arrays = 0
    for reply in grid.received:
        assert not reply.has_error()
        content = reply.content
        assert set(content.keys()) <= set(allowed), set(content.keys())
        for name, rec in content.array_records.items():
            keys = set(rec.keys())
            assert keys == (allowed[name] or trainable), (name, keys)
            for key, arr in rec.items():
                a = arr.numpy()
                n_arrays += 1
                if key == "mask":
                    assert a.dtype == np.int8 and set(np.unique(a)) <= {0, 1}
                    continue
                assert np.issubdtype(a.dtype, np.floating), (name, key, a.dtype)
                # no array carries a label or token sequence, whole or as a row
                flat = a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a[None]
                for secret in secrets_int:
                    for row in secret:
                        n = len(row)
                        assert not any(
                            r.shape[0] >= n and np.array_equal(r[:n], row.numpy()) for r in flat
                        )
        for rec in content.metric_records.values():
            assert not any("loss" in k or "label" in k for k in rec), dict(rec)
            for v in rec.values():
                vals = v if isinstance(v, list) else [v]
                assert not any(
                    isinstance(x, float) and any(abs(x - s) < 1e-9 for s in losses) for x in vals
                )
        assert not content.config_records  # clients send no configs at all
    assert n_arrays > 0
    # what the server receives is bounded by what the protocol says: no reply is an input batch
    assert all(m.metadata.message_type.startswith("train.") for m in grid.sent)


def test_averaging_is_sample_weighted_over_finishers():
    cfg = fused_run_config(APP, CFG)
    grid = LoopbackGrid(app, 2, cfg)
    server = _server(cfg, split_steps=1, local_steps=1)
    rep = server.run_round(grid, 1)
    finals = [m for m in grid.received if m.metadata.message_type == FINISH]
    assert len(finals) == 2
    weights = np.array([float(m.content["metrics"]["num-examples"]) for m in finals])
    states = [{k: v.numpy() for k, v in m.content[PARAMS].items()} for m in finals]
    for key, value in server.state.items():
        expected = sum(w * s[key] for w, s in zip(weights / weights.sum(), states, strict=True))
        np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
    assert rep.num_examples == int(weights.sum())
    # every kind of traffic was counted from the ArrayRecords actually sent
    assert all(v > 0 for v in rep.bytes.values()), rep.bytes
    assert rep.bytes["params-up"] == sum(m.content[PARAMS].count_bytes() for m in finals)


@pytest.mark.parametrize("failure", ["late", "vanished", "raises"])
def test_client_dropping_between_forward_and_backward(caplog, failure):
    cfg = fused_run_config(APP, CFG)
    lost = 101

    def hook(action, msg, context):
        rnd = int(msg.metadata.group_id)
        if failure == "raises" and context.node_id == lost and action == "backward" and rnd == 1:
            raise RuntimeError("client went away")

    def silent(node, mtype, rnd):
        return failure != "raises" and node == lost and mtype == "train.backward" and rnd == 1

    late = {"late": 0.8, "vanished": None, "raises": None}[failure]
    grid = LoopbackGrid(Hooked(hook), 2, cfg, silent=silent, late=late)
    server = _server(cfg, split_steps=2, local_steps=0, timeout=0.5)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rep = server.run_round(grid, 1)
    reason = "error" if failure == "raises" else "timeout"
    assert rep.dropped.keys() == {lost}
    assert rep.dropped[lost].startswith(f"train.backward: {reason}")
    assert rep.finished == [100]
    assert any("dropped at train.backward" in r.getMessage() for r in caplog.records)
    # the round went on: the survivor did all its steps and its state is the new global state
    final = next(m for m in grid.received if m.metadata.message_type == FINISH)
    for key, value in final.content[PARAMS].items():
        np.testing.assert_array_equal(server.state[key], value.numpy())
    # the dropped client got no further step in that round
    later = [m for m in grid.sent if m.metadata.dst_node_id == lost and m.metadata.group_id == "1"]
    expected = ["train.start", "train.forward", "train.tail", "train.backward"]
    assert [m.metadata.message_type for m in later] == expected
    # next round: back once its late reply is in; skipped (and logged) while it has none
    rep2 = server.run_round(grid, 2)
    if failure == "vanished":
        assert rep2.nodes == rep2.finished == [100]
        assert any("still busy" in r.getMessage() for r in caplog.records)
    else:
        assert rep2.finished == [100, 101] and not rep2.dropped


def test_epoch_mode_pruning_cuts_the_split_steps_and_the_bytes():
    cfg = fused_run_config(APP, CFG)  # 60 examples, 2 IID clients of 30, batch 4
    grid = LoopbackGrid(app, 2, cfg)
    server = _server(
        cfg, split_epochs=1.0, local_steps=1, prune_gamma=0.5, prune_warmup_rounds=1, timeout=5.0
    )
    reps = [server.run_round(grid, r) for r in (1, 2)]

    def forwards(rnd):
        return [
            m.metadata.dst_node_id
            for m in grid.sent
            if m.metadata.message_type == "train.forward" and m.metadata.group_id == str(rnd)
        ]

    assert sorted(forwards(1)) == [100] * 8 + [101] * 8  # ceil(30 / 4)
    assert sorted(forwards(2)) == [100] * 4 + [101] * 4  # ceil(15 / 4) after pruning
    assert [r.num_examples for r in reps] == [60, 30]
    assert reps[1].bytes["acts-up"] < 0.7 * reps[0].bytes["acts-up"]
    # each client's epoch visits every kept example exactly once
    for ctx in grid.contexts.values():
        kept = list(ctx.state["sfp.meta"]["kept"])
        assert len(set(kept)) == 15
        client = get_client(cfg, ctx)
        seen = [i for s in range(4) for i in client._sample(kept, 2, s)]
        assert sorted(seen) == sorted(kept)


def test_adam_tail_lr_steps_the_tail_and_the_prompt_by_their_own_rates():
    import torch

    from flwr_ext.llm.sfprompt import Adam

    prompt = torch.nn.Parameter(torch.zeros(3))
    tail = torch.nn.Parameter(torch.zeros(3))
    g = torch.tensor([0.5, -2.0, 1e-3])
    prompt.grad, tail.grad = g.clone(), g.clone()
    moments, steps = {}, {}
    Adam(0.1, tail_lr=0.002).step([("prompt", prompt), ("tail.w", tail)], moments, steps)
    # first Adam step: m_hat = g, v_hat = g^2, update = -lr * g / (|g| + eps)
    unit = g / (g.abs() + 1e-8)
    torch.testing.assert_close(prompt.detach(), -0.1 * unit)
    torch.testing.assert_close(tail.detach(), -0.002 * unit)
    assert steps == {"prompt": 1, "tail.w": 1}


def test_tail_lr_reaches_the_clients_and_moves_the_tail_less():
    cfg = fused_run_config(APP, CFG)
    moves = {}
    for tail_lr in (None, 1e-9):
        grid = LoopbackGrid(app, 2, cfg)
        server = _server(cfg, split_steps=2, local_steps=1, lr=0.05, tail_lr=tail_lr)
        before = dict(server.state)
        server.run_round(grid, 1)
        starts = [m for m in grid.sent if m.metadata.message_type == "train.start"]
        assert {float(m.content["config"]["tail-lr"]) for m in starts} == {tail_lr or 0.0}
        moves[tail_lr] = {k: float(np.abs(server.state[k] - before[k]).max()) for k in before}
    assert len(moves[None]) > 1  # prompt and tail weights
    for key in moves[None]:
        if key == "prompt":  # the prompt's rate is 0.05 in both runs
            assert moves[1e-9][key] > 1e-3 and moves[None][key] > 1e-3
        else:  # each Adam step moves a weight by about its rate: 3 steps of 1e-9 vs of 0.05
            assert moves[1e-9][key] < 1e-8 < 1e-3 < moves[None][key], key
