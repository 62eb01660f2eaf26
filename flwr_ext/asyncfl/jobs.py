"""The jobs in flight, with the two questions the loop asks of them every event, in O(log n).

* the earliest lower bound of a job whose reply has not been pulled yet (under a virtual clock
  an event is handled only before it), and
* the jobs whose wall-clock timeout has passed.

Both are heaps with lazy deletion: a job leaves them when it is next looked at after it ended.
"""

from __future__ import annotations

import heapq
import math

from flwr_ext.asyncfl.types import Job


class InFlight:
    """Jobs sent and not ended, by message id."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}
        self._unreplied: dict[str, Job] = {}
        self._bounds: list[tuple[float, int, str]] = []
        self._sent_at: list[tuple[float, int, str]] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self.jobs)

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self.jobs

    def get(self, msg_id: str) -> Job | None:
        """The job of ``msg_id`` if it is in flight."""
        return self.jobs.get(msg_id)

    def values(self):
        """The jobs in flight (insertion order)."""
        return self.jobs.values()

    def add(self, job: Job) -> None:
        """A job was pushed (``job.msg_id`` set)."""
        assert job.msg_id is not None
        self.jobs[job.msg_id] = job
        self._unreplied[job.msg_id] = job
        self._seq += 1
        heapq.heappush(self._bounds, (job.lower_bound, self._seq, job.msg_id))
        heapq.heappush(self._sent_at, (job.wall_dispatch, self._seq, job.msg_id))

    def replied(self, msg_id: str) -> bool:
        """The reply of ``msg_id`` was pulled; ``False`` if it had been already."""
        return self._unreplied.pop(msg_id, None) is not None

    def awaiting_reply(self, msg_id: str) -> bool:
        """Whether ``msg_id`` is in flight and its reply not pulled yet."""
        return msg_id in self._unreplied

    def remove(self, job: Job) -> None:
        """The job ended."""
        if job.msg_id is not None:
            self.jobs.pop(job.msg_id, None)
            self._unreplied.pop(job.msg_id, None)

    def unreplied_ids(self) -> list[str]:
        """Message ids to pull."""
        return list(self._unreplied)

    def min_lower_bound(self) -> float:
        """Earliest lower bound among jobs whose reply has not been pulled (``inf``: none)."""
        heap = self._bounds
        while heap and heap[0][2] not in self._unreplied:
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def timed_out(self, now_wall: float, timeout: float) -> list[Job]:
        """Jobs without a reply sent more than ``timeout`` wall seconds ago (dispatch order)."""
        out = []
        heap = self._sent_at
        while heap:
            t, _, mid = heap[0]
            if mid not in self._unreplied:
                heapq.heappop(heap)
            elif now_wall - t > timeout:
                heapq.heappop(heap)
                out.append(self._unreplied[mid])
            else:
                break
        return out
