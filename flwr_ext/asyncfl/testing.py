"""An in-process Grid for unit tests and benchmarks of the engine (no Ray, no SuperLink).

:class:`FakeGrid` implements the part of :class:`flwr.serverapp.Grid` the engine uses
(``get_node_ids``, ``push_messages``, ``pull_messages``). Each pull answers up to ``per_pull``
pending messages, picked in a seeded random order, so tests see replies out of dispatch order
as with Ray. ``client_fn(partition_id, message)`` returns the reply's RecordDict or raises
(turned into a ``CLIENT_APP_RAISED_EXCEPTION`` error reply, as Flower does).

:class:`NodeListGrid` is the smaller stand-in for code that only asks for node ids (a Flower
strategy's ``configure_train`` called directly), and :func:`task_identity` gives messages built
outside a Flower runtime the task identity Flower 1.42 requires.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterable, Iterator
from uuid import uuid4

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity

ClientFn = Callable[[int, Message], RecordDict]


@contextlib.contextmanager
def task_identity() -> Iterator[None]:
    """Task 1, run 1, node 0 while inside (messages built outside a runtime need one); restored."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)  # noqa: SLF001
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved  # noqa: SLF001


class NodeListGrid:
    """Just enough of a Grid for ``configure_train``: a fixed list of node ids."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class FakeGrid:
    """In-process Grid: ``num_nodes`` nodes with random ids, partition ids ``0..n-1``.

    Parameters
    ----------
    client_fn : callable
        ``(partition_id, message) -> RecordDict``; may raise.
    num_nodes : int
        Number of nodes.
    seed : int
        Seeds node ids and reply order.
    per_pull : int
        Replies produced per ``pull_messages`` call (``0``: all pending).
    """

    def __init__(
        self, client_fn: ClientFn, num_nodes: int, seed: int = 0, per_pull: int = 0
    ) -> None:
        self.client_fn = client_fn
        self._rng = random.Random(seed)
        self.node_ids = self._rng.sample(range(1, 2**40), num_nodes)
        self.partition = {nid: i for i, nid in enumerate(self.node_ids)}
        self.per_pull = per_pull
        self._pending: dict[str, Message] = {}
        self.pushed = 0
        self.client_time = 0.0
        self.client_cpu = 0.0  # thread CPU seconds spent in client_fn
        # Message() needs a run identity; a real ServerApp process has one (Flower sets it).
        if TaskIdentity._run_id is None:  # noqa: SLF001
            TaskIdentity.task_id, TaskIdentity.run_id = 1, 1
            TaskIdentity.node_id = SUPERLINK_NODE_ID

    def add_node(self) -> int:
        """Connect one more node; return its id."""
        nid = self._rng.randrange(1, 2**40)
        self.partition[nid] = len(self.partition)
        self.node_ids.append(nid)
        return nid

    def remove_node(self, node_id: int) -> None:
        """Disconnect a node (its pending messages are dropped)."""
        self.node_ids.remove(node_id)
        for mid, msg in list(self._pending.items()):
            if msg.metadata.dst_node_id == node_id:
                del self._pending[mid]

    def get_node_ids(self) -> Iterable[int]:
        """Connected node ids."""
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; return their new ids."""
        ids = []
        for msg in messages:
            mid = str(uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            self._pending[mid] = msg
            ids.append(mid)
            self.pushed += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Run the ClientApp on some pending messages and return their replies."""
        wanted = [m for m in message_ids if m in self._pending]
        self._rng.shuffle(wanted)
        if self.per_pull:
            wanted = wanted[: self.per_pull]
        replies = []
        for mid in wanted:
            msg = self._pending.pop(mid)
            pid = self.partition[msg.metadata.dst_node_id]
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                content = self.client_fn(pid, msg)
                reply = Message(content, reply_to=msg)
            except Exception as exc:  # noqa: BLE001  (as Flower: exception -> error reply)
                reply = Message(
                    Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, repr(exc)), reply_to=msg
                )
            self.client_time += time.perf_counter() - t0
            self.client_cpu += time.thread_time() - c0
            replies.append(reply)
        return replies
