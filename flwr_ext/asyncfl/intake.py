"""The reply gate: every pulled reply passes here once before a strategy can see it.

:class:`Intake` keeps the message-id ledger (a reply is paired with the job it answers at most
once; replies to messages never sent, and second replies, are dropped) and turns a reply into
:class:`Accepted` (a decoded :class:`~flwr_ext.asyncfl.types.Update`) or :class:`Rejected`
with a :class:`Reason`. Checks, in order: message type ``train``, size (``max_reply_bytes``,
or by default the size of the model sent: a reply can never legitimately be larger), one
ArrayRecord, the sample count, decoding (compressed payloads become deltas; plain arrays are
read without a copy), keys, shapes, dtypes, finiteness.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from flwr_ext.arrays import array_to_numpy
from flwr_ext.compression.errors import CompressionError
from flwr_ext.compression.server import STYPE_PREFIX, decode_deltas

#: Reply metric by which a client says its plain arrays are a delta, not full weights.
DELTA_FLAG = "flwr-ext-delta"
#: Reply metrics that identify a node; never averaged into the round's metrics.
IDENTITY_KEYS = frozenset({"partition-id", DELTA_FLAG})


class Reason(StrEnum):
    """Why a job ended without an update (the key of ``result.reasons``)."""

    UNKNOWN_REPLY = "reply to a message never sent"
    DUPLICATE_REPLY = "reply to a message already processed"
    WRONG_TYPE = "unexpected message type"
    TOO_LARGE = "reply too large"
    RECORDS = "expected 1 ArrayRecord"
    BAD_COUNT = "invalid sample count"
    CORRUPT = "corrupt payload"
    NOT_A_DELTA = "expected a delta"
    WRONG_KEYS = "wrong keys"
    UNREADABLE = "unreadable array"
    WRONG_SHAPE = "wrong shape"
    NON_NUMERIC = "non-numeric dtype"
    WRONG_DTYPE = "wrong dtype"
    NON_FINITE = "non-finite values (NaN/Inf)"
    JOB_TIMEOUT = "job timeout"
    NODE_VANISHED = "node vanished"
    PUSH_FAILED = "push failed"
    PUSH_FAILED_ON_RESUME = "push failed on resume"
    VERSION_NOT_KEPT = "model version not kept (replies are deltas)"
    AFTER_END = "reply after the run ended"
    LATE_REPLY = "reply after its job timed out"
    IN_FLIGHT_AT_END = "in flight at the end"
    NO_DOWNLINK_RECORD = "no downlink record (the ClientApp lacks compression_mod)"
    DOWNLINK_VERSION = "downlink shadow version differs from the one sent"


def describe(reason: str, detail: str = "") -> str:
    """The text of a record's ``reason`` column: the reason, then the detail if any."""
    return f"{reason}: {detail}" if detail else str(reason)


@dataclass(frozen=True)
class Accepted:
    """A valid reply: its delta or its full weights, the sample count and the metrics."""

    delta: dict[str, np.ndarray] | None
    params: dict[str, np.ndarray] | None
    num_examples: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Rejected:
    """A reply that is not a valid update, with the reason and a detail for the log."""

    reason: Reason
    detail: str = ""
    num_examples: float = 0.0

    def __str__(self) -> str:
        return describe(self.reason, self.detail)


def reply_metrics(content: RecordDict) -> dict[str, Any]:
    """The reply's (first) MetricRecord as a dict; empty when it has none."""
    rec = next(iter(content.metric_records.values()), None)
    return dict(rec) if rec is not None else {}


def partition_id(content: RecordDict) -> int | None:
    """The ``partition-id`` a reply carries (in a MetricRecord or a ConfigRecord), if any."""
    for rec in (*content.metric_records.values(), *content.config_records.values()):
        value = rec.get("partition-id")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return None


def is_finite(arr: np.ndarray) -> bool:
    """Whether every value of a numeric array is finite."""
    if arr.dtype.kind not in "fc" or not arr.size:
        return True
    return bool(np.isfinite(arr).all())


class Intake:
    """Pairs replies with jobs (the ledger) and checks them (see the module docstring).

    Parameters
    ----------
    weighted_by_key : str or None
        Reply metric holding the sample count the strategy weights by: required, a finite
        number > 0. ``None`` (the strategy does not weight by samples): ``num-examples`` is
        read if present (finite, >= 0), else 1.
    max_reply_bytes : int
        Largest accepted reply (ArrayRecord bytes); 0: twice the size of the model sent.
    replies_are_deltas : bool
        Plain replies must carry the metric ``flwr-ext-delta = 1`` (compressed ones always are
        deltas).
    count_ratio : float
        Bound on one reply's sample count relative to the recent median (:meth:`bound_count`).
    """

    def __init__(
        self,
        weighted_by_key: str | None,
        max_reply_bytes: int = 0,
        replies_are_deltas: bool = False,
        count_ratio: float = 10.0,
    ) -> None:
        self.weighted_by_key = weighted_by_key
        self.max_reply_bytes = int(max_reply_bytes)
        self.replies_are_deltas = bool(replies_are_deltas)
        self.count_ratio = float(count_ratio)
        self.handled: set[str] = set()
        self.recent_counts: deque[float] = deque(maxlen=1000)
        self._sorted_counts: list[float] = []  # the same counts, sorted (for the median)
        self.clipped = 0

    def _median_count(self) -> float:
        """``np.median(recent_counts)``, read off the sorted copy (no array built per reply)."""
        s, m = self._sorted_counts, len(self._sorted_counts)
        return s[m // 2] if m % 2 else (s[m // 2 - 1] + s[m // 2]) / 2

    def bound_count(self, n: float) -> float:
        """``n`` clipped to ``count_ratio`` times the median of the recent accepted counts.

        A robustness knob, not a defence against a Byzantine adversary: one client that
        reports ``num-examples = 1e18`` cannot take the whole weight of an aggregation. Active
        once 3 counts were seen; ``count_ratio = 0`` disables it.
        """
        if self.count_ratio > 0 and len(self.recent_counts) >= 3:
            cap = self.count_ratio * self._median_count()
            if n > cap:
                self.clipped += 1
                n = cap
        if len(self.recent_counts) == self.recent_counts.maxlen:
            del self._sorted_counts[bisect_left(self._sorted_counts, self.recent_counts[0])]
        self.recent_counts.append(n)
        insort(self._sorted_counts, n)
        return n

    # ------------------------------------------------------------------ the ledger
    def close(self, msg_id: str | None) -> None:
        """The job of ``msg_id`` ended: any later reply to it is a duplicate."""
        if msg_id is not None:
            self.handled.add(msg_id)

    def unpaired_reason(self, msg_id: str) -> Reason:
        """Why a reply matched no job in flight: never sent, or already processed."""
        return Reason.DUPLICATE_REPLY if msg_id in self.handled else Reason.UNKNOWN_REPLY

    # ------------------------------------------------------------------ the checks
    def check(
        self,
        reply: Message,
        bytes_up: int,
        spec: dict[str, tuple[tuple[int, ...], np.dtype]],
        model_bytes: int,
        base: dict[str, np.ndarray] | None,
    ) -> Accepted | Rejected:
        """Check and decode one reply to a job that was sent ``spec``'s model.

        ``base`` (the model version the job was sent) is needed only to turn a mixed reply
        (some tensors compressed, some plain) into full weights; it may be ``None``.
        """
        limit = self.max_reply_bytes or 2 * model_bytes + 65536
        if bytes_up > limit:
            return Rejected(Reason.TOO_LARGE, f"{bytes_up} bytes > {limit}")
        content = reply.content
        metrics = reply_metrics(content)
        key = self.weighted_by_key or "num-examples"
        n = metrics.get(key)
        if n is None and not self.weighted_by_key:
            n = 1.0
        if n is None:
            return Rejected(Reason.BAD_COUNT, f"{key} missing (the strategy weights by it)")
        if isinstance(n, bool) or not isinstance(n, int | float):
            return Rejected(Reason.BAD_COUNT, f"{key} = {n!r} is not a number")
        num_examples = float(n)
        least = 0.0 if not self.weighted_by_key else math.ulp(0.0)
        if not math.isfinite(num_examples) or num_examples < least:
            rule = "> 0" if self.weighted_by_key else ">= 0"
            return Rejected(Reason.BAD_COUNT, f"{key} = {n!r} (must be finite and {rule})")
        records = content.array_records
        if len(records) != 1:
            return Rejected(Reason.RECORDS, f"got {len(records)}", num_examples)
        record: ArrayRecord = next(iter(records.values()))
        if set(record.keys()) != set(spec):
            missing = sorted(set(spec) - set(record.keys()))[:3]
            extra = sorted(set(record.keys()) - set(spec))[:3]
            return Rejected(Reason.WRONG_KEYS, f"missing {missing}, extra {extra}", num_examples)
        compressed = [k for k, a in record.items() if a.stype.startswith(STYPE_PREFIX)]
        try:
            decoded = decode_deltas(record, {k: (s, str(d)) for k, (s, d) in spec.items()})
        except CompressionError as exc:
            return Rejected(Reason.CORRUPT, str(exc), num_examples)
        flagged = bool(metrics.get(DELTA_FLAG, 0))
        arrays: dict[str, np.ndarray] = {}
        for name, (shape, dtype) in spec.items():
            if name in decoded:
                arr = decoded[name]
            else:
                try:
                    arr = array_to_numpy(record[name])
                except (TypeError, ValueError) as exc:
                    return Rejected(Reason.UNREADABLE, f"{name!r}: {exc}", num_examples)
            if arr.shape != tuple(shape):
                return Rejected(
                    Reason.WRONG_SHAPE, f"{name} {arr.shape} != {tuple(shape)}", num_examples
                )
            if not np.issubdtype(arr.dtype, np.number):
                return Rejected(Reason.NON_NUMERIC, f"{name} {arr.dtype}", num_examples)
            if arr.dtype != dtype:
                return Rejected(Reason.WRONG_DTYPE, f"{name} {arr.dtype} != {dtype}", num_examples)
            if not is_finite(arr):
                return Rejected(Reason.NON_FINITE, name, num_examples)
            arrays[name] = arr
        num_examples = self.bound_count(num_examples)
        if (compressed and len(compressed) == len(spec)) or flagged:
            return Accepted(arrays, None, num_examples, metrics)
        if self.replies_are_deltas:
            return Rejected(
                Reason.NOT_A_DELTA, f"plain reply without {DELTA_FLAG} = 1", num_examples
            )
        if compressed:  # mixed: plain tensors are weights, decoded ones deltas
            if base is None:
                return Rejected(Reason.CORRUPT, "mixed reply and no base model", num_examples)
            for name in compressed:
                arrays[name] = base[name] + arrays[name].astype(base[name].dtype)
        return Accepted(None, arrays, num_examples, metrics)


def train_metrics(metrics: MetricRecord | dict[str, Any]) -> dict[str, Any]:
    """Client metrics without the identity keys (``partition-id``, ``flwr-ext-delta``)."""
    return {k: v for k, v in dict(metrics).items() if k not in IDENTITY_KEYS}
