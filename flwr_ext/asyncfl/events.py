"""Typed events and the queue that orders them on the engine's clock.

A job completion (a reply, an error reply, a reply rejected before decoding) and a strategy
timer are events at a clock time. The queue orders them by ``(time, kind, node, job index,
arrival)``: completions before timers at the same time, then by node key and job index, so the
order is a function of the events alone, not of the order Ray returned the replies in.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import IntEnum

from flwr.app import Message

from flwr_ext.asyncfl.types import Job, Timer


class Order(IntEnum):
    """Tie-break between events at the same time (lower first)."""

    COMPLETION = 0
    TIMER = 1


@dataclass(frozen=True)
class ReplyArrived:
    """A reply to ``job``, to be checked and decoded when its time comes."""

    job: Job
    reply: Message
    bytes_up: int


@dataclass(frozen=True)
class JobErrored:
    """An error reply (Flower's ``Error``: the ClientApp raised, the TTL expired, ...).

    ``kind`` names the error (counted in ``result.reasons``); ``reason`` adds Flower's text.
    """

    job: Job
    kind: str
    reason: str


@dataclass(frozen=True)
class ReplyRefused:
    """A reply refused before decoding (wrong message type)."""

    job: Job
    reason: str


@dataclass(frozen=True)
class TimerDue:
    """A strategy timer."""

    timer: Timer


Completion = ReplyArrived | JobErrored | ReplyRefused
Event = Completion | TimerDue


class EventQueue:
    """A heap of events keyed by clock time (see the module docstring for ties)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, int, int, Event]] = []
        self.seq = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push_completion(self, t: float, event: Completion) -> None:
        """Queue a job completion at clock time ``t``."""
        job = event.job
        self._push(t, Order.COMPLETION, job.node.ident, job.job_index, event)

    def push_timer(self, timer: Timer) -> None:
        """Queue a strategy timer at ``timer.at``."""
        self._push(timer.at, Order.TIMER, 0, timer.seq, TimerDue(timer))

    def _push(self, t: float, order: int, ident: int, sub: int, event: Event) -> None:
        self.seq += 1
        heapq.heappush(self._heap, (float(t), int(order), int(ident), int(sub), self.seq, event))

    def next_time(self) -> float | None:
        """Time of the earliest event (``None`` when empty)."""
        return self._heap[0][0] if self._heap else None

    def pop(self) -> tuple[float, Event]:
        """Remove and return the earliest ``(time, event)``."""
        t, *_, event = heapq.heappop(self._heap)
        return t, event

    def pop_ready(self, horizon: float, *, strict: bool) -> tuple[float, Event] | None:
        """The earliest event if its time is before ``horizon`` (``<=`` when not ``strict``)."""
        t = self.next_time()
        if t is None or (t >= horizon if strict else t > horizon):
            return None
        return self.pop()

    def timers(self) -> list[Timer]:
        """Pending, not cancelled timers (for a checkpoint)."""
        return sorted(
            e.timer for *_, e in self._heap if isinstance(e, TimerDue) and not e.timer.cancelled
        )
