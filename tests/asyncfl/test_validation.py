"""Server-side validation of every reply (issue 8): each bad reply is skipped with a reason,
counted, never aggregated, and the run goes on; accepted updates are applied exactly once."""

from __future__ import annotations

import copy
import csv
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from flwr_ext.asyncfl import DeviceProfile, VirtualClock
from flwr_ext.asyncfl.intake import Reason
from flwr_ext.asyncfl.testing import FakeGrid
from flwr_ext.strategies import FedAsync, FedBuff

from .helpers import init_arrays, shift_client

ROUNDS = 12
HOMOG = DeviceProfile("homogeneous", mean_step_time=0.1, latency=0.0)


def _bad_client(kind: str):
    """Node 0 answers well; node 1 answers a reply of the given bad ``kind``."""

    def client(pid: int, msg: Message) -> RecordDict:
        good = shift_client(pid, msg)
        if pid != 1:
            return good
        arrays = {k: v.numpy() for k, v in good["arrays"].items()}
        if kind == "wrong-keys":
            arrays["extra"] = np.zeros(1, np.float32)
        elif kind == "wrong-shape":
            arrays["w"] = np.zeros((4, 3), np.float32)
        elif kind == "wrong-dtype":
            arrays["w"] = arrays["w"].astype(np.float64)
        elif kind == "nan":
            arrays["b"][0] = np.nan
        elif kind == "inf":
            arrays["w"][1, 1] = -np.inf
        elif kind == "too-large":
            arrays["w"] = np.zeros((3, 4), np.float32)  # same shape; size checked on bytes
        metrics = good["metrics"]
        if kind == "too-large":  # a second ArrayRecord makes the payload big
            big = ArrayRecord({"pad": Array(np.zeros(10_000, np.float32))})
            return RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "pad": big,
                    "metrics": metrics,
                }
            )
        return RecordDict(
            {"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}), "metrics": metrics}
        )

    return client


REASONS = {
    "wrong-keys": "wrong keys",
    "wrong-shape": "wrong shape",
    "wrong-dtype": "wrong dtype",
    "nan": "non-finite values (NaN/Inf): b",
    "inf": "non-finite values (NaN/Inf): w",
    "too-large": "reply too large",
}


@pytest.mark.parametrize("kind", list(REASONS))
def test_bad_reply_is_skipped_counted_and_run_goes_on(kind):
    grid = FakeGrid(_bad_client(kind), 3, seed=1)
    res = FedAsync(alpha=0.5).start(
        grid,
        init_arrays(),
        num_rounds=ROUNDS,
        clock=VirtualClock(HOMOG),
        poll_interval=0,
        max_failures=100,  # keep the bad node so every one of its replies is checked
        max_reply_bytes=20_000,
    )
    assert res.stop_reason == "num_rounds reached"
    bad = [r for r in res.finished if r.node == 1]
    assert bad and all(not r.accepted and r.applied_in == -1 for r in bad)
    assert all(r.reason.startswith(REASONS[kind]) for r in bad), {r.reason for r in bad}
    assert res.counters["updates-rejected"] == len(bad)
    # counted under the reason alone (a Reason member), the tensor name only in the record
    assert res.reasons[str(Reason(REASONS[kind].split(": ")[0]))] == len(bad)
    assert res.counters["updates-applied"] == ROUNDS
    assert {r.node for r in res.updates if r.applied_in >= 0} == {0, 2}
    assert np.all(np.isfinite(res.arrays["w"].numpy()))


class MeddlingGrid(FakeGrid):
    """Adds, to the real replies, a second copy of an earlier reply, a reply to a message id
    the server never sent, and (for node 2) replies whose message type is not ``train``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._seen: list[Message] = []
        self.injected = Counter()

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        extra = []
        for reply in replies:
            if self.partition.get(reply.metadata.src_node_id) == 2:
                reply.metadata.__dict__["_message_type"] = "query"
        if self._seen and len(self._seen) % 3 == 0:
            extra.append(copy.deepcopy(self._seen[-1]))
            self.injected["duplicate"] += 1
        if replies and len(self._seen) % 4 == 1:
            forged = copy.deepcopy(replies[0])
            forged.metadata.__dict__["_reply_to_message_id"] = f"forged-{len(self._seen)}"
            extra.append(forged)
            self.injected["forged"] += 1
        self._seen.extend(replies)
        return replies + extra


def test_duplicates_forged_ids_and_wrong_types_are_dropped_and_ledger_is_exactly_once(tmp_path):
    grid = MeddlingGrid(shift_client, 4, seed=3, per_pull=1)
    ledger = tmp_path / "ledger.csv"
    res = FedBuff(buffer_size=2).start(
        grid,
        init_arrays(),
        num_rounds=ROUNDS,
        clock=VirtualClock(HOMOG),
        poll_interval=0,
        max_failures=1000,
        ledger_path=str(ledger),
    )
    assert res.stop_reason == "num_rounds reached"
    assert grid.injected["duplicate"] > 0 and grid.injected["forged"] > 0
    c = res.counters
    assert c["duplicate-replies"] == grid.injected["duplicate"]
    assert c["unknown-replies"] == grid.injected["forged"]
    assert res.reasons["reply to a message already processed"] == grid.injected["duplicate"]
    assert res.reasons["reply to a message never sent"] == grid.injected["forged"]
    # rejected before its metrics are read, node 2 is known by node id only
    typed = [r for r in res.finished if grid.partition[r.node_id] == 2]
    assert typed and all(r.reason.startswith("unexpected message type") for r in typed)
    assert all(r.applied_in == -1 for r in typed)

    with ledger.open() as fh:
        rows = list(csv.DictReader(fh))
    ids = [r["msg_id"] for r in rows]
    assert len(ids) == len(set(ids)) == c["updates-accepted"]
    applied = [r for r in rows if r["status"] == "applied"]
    assert len(applied) == c["updates-applied"]
    per_version = Counter(int(r["applied_in"]) for r in applied)
    assert per_version == {v: m["num-updates"] for v, m in res.train_metrics_clientapp.items()}
    assert all(grid.partition[int(r["node_id"])] != 2 for r in rows)
    # each accepted update's id is the id of a train message the server pushed
    assert all(r["msg_id"] for r in rows)


def test_unknown_message_type_from_error_free_reply_does_not_retire_good_nodes():
    grid = MeddlingGrid(shift_client, 4, seed=3)
    res = FedAsync(alpha=0.5).start(
        grid,
        init_arrays(),
        num_rounds=6,
        clock=VirtualClock(HOMOG),
        poll_interval=0,
        max_failures=2,
    )
    assert res.stop_reason == "num_rounds reached"
    bad = {grid.partition[r.node_id] for r in res.updates if r.reason.startswith("unexpected")}
    assert bad == {2}
    assert res.counters["nodes-retired"] == 1
