"""The light deployment app (bench/apps/light-async): numpy only, learns, node config keys."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parents[2] / "bench" / "apps" / "light-async"


@pytest.fixture(scope="module")
def task():
    sys.path.insert(0, str(APP_DIR))
    try:
        from light_async import task as mod

        yield mod
    finally:
        sys.path.remove(str(APP_DIR))


def test_apps_import_neither_torch_nor_sklearn():
    code = (
        "import sys, json; import light_async.client_app, light_async.server_app; "
        "print(json.dumps([m for m in ('torch', 'sklearn') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=APP_DIR, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_digits_read_without_sklearn_are_the_digits(task):
    x, y = task.load_digits_numpy()
    assert x.shape == (1797, 64) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() == 1.0
    # facts of sklearn's load_digits(): class sizes and the first image (a zero)
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert (x[0, :8] * 16).tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_partitions_are_disjoint_and_cover_the_training_set(task):
    x_all, _ = task.load_digits_numpy()
    n_train = len(x_all) - task.NUM_TEST
    sizes = [len(task.partition(i, 7)[1]) for i in range(7)]
    assert sum(sizes) == n_train
    assert max(sizes) - min(sizes) <= 1
    # disjoint and an exact cover of the training rows: identify each image by its row
    # (sklearn's digits contain a few duplicate images, so match rows by bytes with counts)
    from collections import Counter

    train_rows = Counter(row.tobytes() for row in x_all[:n_train])
    got = Counter(row.tobytes() for i in range(7) for row in task.partition(i, 7)[0])
    assert got == train_rows
    # and the server's held-out rows are the rows no partition draws from
    np.testing.assert_array_equal(task.held_out_set()[0], x_all[n_train:])
    with pytest.raises(ValueError):
        task.partition(7, 7)


def test_local_training_lowers_the_loss(task):
    x, y = task.partition(0, 4)
    params = task.init_params()
    loss0, _ = task.loss_and_accuracy(params, x, y)
    new, _ = task.train(params, x, y, 50, 32, 0.5, np.random.default_rng(0))
    loss1, acc1 = task.loss_and_accuracy(new, x, y)
    assert loss1 < 0.5 * loss0
    assert acc1 > 0.8
    assert new["w"].dtype == np.float32 and new["w"].shape == (64, 10)
    assert not np.any(params["w"])  # the input model was not modified in place


@pytest.fixture
def task_identity():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, SUPERLINK_NODE_ID
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


def test_clientapp_honours_delay_and_writes_the_reply_log(task, task_identity, tmp_path):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from light_async.client_app import train_fn

    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in task.init_params().items()}),
            "config": ConfigRecord({"lr": 0.1, "local-steps": 3, "server-round": 0}),
        }
    )
    msg = Message(content=content, dst_node_id=1, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m-1"  # as the SuperNode sets it on receipt
    node_config = {"partition-id": 2, "num-partitions": 4, "delay-s": 0.3}
    node_config["reply-log"] = str(tmp_path)
    ctx = Context(
        run_id=7,
        node_id=1,
        node_config=node_config,
        state=RecordDict(),
        run_config={"seed": 0, "batch-size": 16},
    )
    t0 = time.monotonic()
    reply = train_fn(msg, ctx)
    assert time.monotonic() - t0 >= 0.3
    metrics = reply.content["metrics"]
    assert metrics["partition-id"] == 2 and metrics["num-steps"] == 3
    assert metrics["num-examples"] == len(task.partition(2, 4)[1])
    assert metrics["delay-s"] == pytest.approx(0.3)
    new_w = reply.content["arrays"]["w"].numpy()
    assert new_w.shape == (64, 10) and np.any(new_w)
    line = (tmp_path / "client-2.csv").read_text().strip().split(",")
    assert line[:3] == ["7", "m-1", "2"]
    assert float(line[4]) > 0  # the ClientApp process's CPU time
