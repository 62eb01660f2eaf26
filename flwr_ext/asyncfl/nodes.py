"""The node registry: who is connected, who is idle, who is retired, and the one retirement rule.

Nodes are keyed by Flower node id; :class:`~flwr_ext.asyncfl.types.NodeState` carries the
stable identity (rank, ``partition-id``). The idle nodes are kept sorted by identity, so a
dispatch costs O(idle) rather than O(nodes), and a seeded sampler can draw from them in O(1) per
draw (the concurrency cap of cross-device runs).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable
from logging import WARNING

from flwr.common.logger import log

from flwr_ext.asyncfl.types import NodeState


class NodeRegistry:
    """Connected nodes and their idle / busy / retired state.

    Parameters
    ----------
    max_failures : int
        Consecutive failures of one node after which it is retired (:meth:`failed`).
    """

    def __init__(self, max_failures: int) -> None:
        self.max_failures = int(max_failures)
        self.nodes: dict[int, NodeState] = {}
        self.num_seen = 0
        self.discovered = 0
        self.retired = 0
        self._idle: list[tuple[int, int]] = []  # sorted (ident, node_id)
        self._failed_at: dict[int, float] = {}  # node id -> wall time it was retired for failures
        self._active = 0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def num_active(self) -> int:
        """Nodes not retired."""
        return self._active

    @property
    def num_idle(self) -> int:
        """Active nodes without a job."""
        return len(self._idle)

    def idle(self) -> list[NodeState]:
        """Idle active nodes, sorted by identity (``partition-id`` or rank)."""
        return [self.nodes[nid] for _, nid in self._idle]

    def idle_at(self, positions: Iterable[int]) -> list[NodeState]:
        """The idle nodes at these positions of :meth:`idle` (for a sampler)."""
        return [self.nodes[self._idle[i][1]] for i in positions]

    # ------------------------------------------------------------------ state changes
    def add(self, node_id: int, key: int | None = None) -> NodeState:
        """Register a newly seen node (idle)."""
        node = NodeState(node_id=int(node_id), rank=self.num_seen, key=key)
        self.num_seen += 1
        self.discovered += 1
        self.nodes[node.node_id] = node
        self._active += 1
        self._set_idle(node)
        return node

    def set_key(self, node: NodeState, key: int) -> None:
        """Record the ``partition-id`` a node reported (its identity from now on)."""
        if node.key == key:
            return
        idle = not node.busy and not node.retired
        if idle:
            self._unset_idle(node)
        node.key = key
        if idle:
            self._set_idle(node)

    def mark_busy(self, node: NodeState) -> None:
        """A job was sent to ``node``."""
        if not node.busy and not node.retired:
            self._unset_idle(node)
        node.busy = True

    def mark_free(self, node: NodeState) -> None:
        """``node``'s job ended (reply, failure, or given up)."""
        if node.busy and not node.retired:
            self._set_idle(node)
        node.busy = False

    def succeeded(self, node: NodeState) -> None:
        """A valid reply: the node's consecutive-failure and expired-message counts restart."""
        node.failures = 0
        node.expired = 0

    def failed(self, node: NodeState, reason: str) -> bool:
        """One failure of ``node`` (error, rejected reply, timeout); retire it at the limit.

        The one place failures are counted and the one retirement rule besides a node that
        left (:meth:`retire`). Returns whether the node was retired now.
        """
        node.failures += 1
        if node.failures >= self.max_failures and not node.retired:
            self.retire(node, f"{node.failures} consecutive failures (last: {reason})")
            return True
        return False

    def retire(self, node: NodeState, reason: str, *, vanished: bool = False) -> None:
        """Stop using ``node`` (it left, or failed too often: then it may be readmitted)."""
        if node.retired:
            return
        if not vanished:
            self._failed_at[node.node_id] = time.monotonic()
        if not node.busy:
            self._unset_idle(node)
        node.retired = True
        node.busy = False
        self._active -= 1
        self.retired += 1
        log(WARNING, "Retiring node %d (key %d): %s", node.node_id, node.ident, reason)

    def readmittable(self, before: float, present: set[int]) -> list[NodeState]:
        """Nodes retired for failures before wall time ``before`` that are still connected."""
        return [
            self.nodes[nid]
            for nid, t in sorted(self._failed_at.items())
            if t <= before and nid in present and nid in self.nodes and self.nodes[nid].retired
        ]

    def readmit(self, node: NodeState) -> None:
        """Give a node retired for failures another chance (failure count restarts)."""
        self._failed_at.pop(node.node_id, None)
        node.retired, node.busy, node.failures = False, False, 0
        self._active += 1
        self._set_idle(node)
        log(WARNING, "Readmitting node %d (key %d)", node.node_id, node.ident)

    def replace_all(self, nodes: Iterable[NodeState]) -> None:
        """Install nodes restored from a checkpoint (all idle unless retired)."""
        self.nodes = {}
        self._idle = []
        self._active = 0
        for node in nodes:
            node.busy = False
            self.nodes[node.node_id] = node
            if not node.retired:
                self._active += 1
                self._set_idle(node)

    def rebind(self, node: NodeState, node_id: int) -> None:
        """``node`` is now reached under Flower node id ``node_id`` (after a resume)."""
        idle = not node.busy and not node.retired
        if idle:
            self._unset_idle(node)
        del self.nodes[node.node_id]
        node.node_id = int(node_id)
        self.nodes[node.node_id] = node
        if idle:
            self._set_idle(node)

    # ------------------------------------------------------------------ internals
    def _set_idle(self, node: NodeState) -> None:
        bisect.insort(self._idle, (node.ident, node.node_id))

    def _unset_idle(self, node: NodeState) -> None:
        item = (node.ident, node.node_id)
        i = bisect.bisect_left(self._idle, item)
        if i < len(self._idle) and self._idle[i] == item:
            del self._idle[i]
