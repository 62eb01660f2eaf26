"""The engine's settings: one frozen, validated dataclass (like PEFT's configs).

:meth:`AsyncStrategy.start <flwr_ext.asyncfl.strategy.AsyncStrategy.start>` takes these as
keyword arguments and the engine reads them from here; they are declared nowhere else. A bad
value fails when the options are built, before the first message is sent, with the name of the
setting, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if not isinstance(value, Integral):
        if isinstance(value, Real) and math.isfinite(value) and float(value).is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _float(name: str, value: Any, lo: float, *, strict: bool = False, inf: bool = False) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (value > lo if strict else value >= lo) and (inf or math.isfinite(value))
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be a number {rel} {lo}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EngineOptions:
    """Settings of one asynchronous run.

    Parameters
    ----------
    num_rounds : int
        Server model versions to reach (a "round" is one server model update).
    timeout : float
        Per-job wall timeout in seconds (also the message TTL).
    max_time : float
        Stop when the clock passes this time (``inf``: no limit).
    eval_every : int
        Evaluate every this many model versions (and the last one).
    eval_period : float
        If > 0, evaluate instead on the first version at or after every multiple of this clock
        time (an even time grid for time-to-accuracy curves).
    wall_timeout : float or None
        Wall-clock limit of the whole run, counted from the moment ``min_nodes`` nodes are
        connected (the Simulation Engine can take a minute to start its workers).
    max_failures : int
        Consecutive failed jobs of one node after which that node is retired.
    min_nodes : int
        Wait (up to ``wall_timeout``) until this many nodes are connected.
    max_concurrency : int
        At most this many jobs in flight (0: every idle node gets a job). Nodes are drawn from
        the idle ones by a seeded uniform sampler (Papaya / FedBuff's cross-device set-up).
    sampler_seed : int
        Seed of that sampler (one stream, consumed in event order; saved in checkpoints).
    poll_interval, node_poll_interval : float
        Seconds between ``pull_messages`` / ``get_node_ids`` calls when idle.
    csv_path, ledger_path : str or None
        Write the per-update records / the ledger of accepted updates there at the end.
    checkpoint_dir : str or None
        Write checkpoints there (atomically) every ``checkpoint_every`` versions.
    checkpoint_every : int
        Versions between checkpoints; 0 disables checkpointing.
    resume_from : str or None
        A checkpoint file, or a directory (its newest checkpoint): continue that run.
    max_reply_bytes : int
        Reject replies whose ArrayRecords exceed this many bytes (0: the decoder's own limit,
        which follows the size of the model sent).
    drain_timeout : float
        After the run, keep pulling up to this many wall seconds for the jobs still in flight.
    replies_are_deltas : bool
        The clients send deltas (the compression mod always does; plain replies then need the
        metric ``flwr-ext-delta = 1``). The server then keeps a model version only while a
        strategy that mixes full weights (FedAsync) may still need it.
    max_count_ratio : float
        A reply's sample count is clipped to this many times the median of the recent counts
        (a robustness knob against one client owning the aggregate, not a Byzantine defence);
        0: no bound.
    warmup : bool
        Before the clock (and ``wall_timeout``) starts, send every node one short job and wait
        for ``min_nodes`` answers: the Simulation Engine can take a minute to start.
    readmit_after : float or None
        Wall seconds after which a node retired for failures (not one that left) that is still
        connected gets another chance. ``None``: retired for good.
    downlink : str, PipelineConfig or None
        Downlink compressor (EF21-P, :mod:`flwr_ext.compression.downlink`): each job sends its
        node ``C(x_v - w_i)`` against the shadow ``w_i`` the engine keeps for it (one shadow per
        node ever sent a model: memory grows with the number of nodes). A preset spec such as
        ``"fedzip"``; ``None`` / ``"none"``: the model is sent as it is. The nodes need
        :func:`~flwr_ext.compression.compression_mod`.
    downlink_seed : int
        Seed of the downlink compressor's stochastic stages (random-k, QSGD).
    """

    num_rounds: int = 3
    timeout: float = 3600.0
    max_time: float = math.inf
    eval_every: int = 1
    eval_period: float = 0.0
    wall_timeout: float | None = None
    max_failures: int = 3
    min_nodes: int = 1
    max_concurrency: int = 0
    sampler_seed: int = 0
    poll_interval: float = 0.02
    node_poll_interval: float = 2.0
    csv_path: str | None = None
    ledger_path: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume_from: str | None = None
    max_reply_bytes: int = 0
    drain_timeout: float = 0.0
    replies_are_deltas: bool = False
    max_count_ratio: float = 10.0
    warmup: bool = False
    readmit_after: float | None = None
    downlink: Any = None
    downlink_seed: int = 0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "num_rounds", _int("num_rounds", self.num_rounds, 0))
        set_(self, "timeout", _float("timeout", self.timeout, 0.0, strict=True, inf=True))
        set_(self, "max_time", _float("max_time", self.max_time, 0.0, strict=True, inf=True))
        set_(self, "eval_every", _int("eval_every", self.eval_every, 1))
        set_(self, "eval_period", _float("eval_period", self.eval_period, 0.0))
        if self.wall_timeout is not None:
            set_(self, "wall_timeout", _float("wall_timeout", self.wall_timeout, 0.0, strict=True))
        set_(self, "max_failures", _int("max_failures", self.max_failures, 1))
        set_(self, "min_nodes", _int("min_nodes", self.min_nodes, 0))
        set_(self, "max_concurrency", _int("max_concurrency", self.max_concurrency, 0))
        set_(self, "sampler_seed", _int("sampler_seed", self.sampler_seed, 0))
        set_(self, "poll_interval", _float("poll_interval", self.poll_interval, 0.0))
        set_(self, "node_poll_interval", _float("node_poll_interval", self.node_poll_interval, 0))
        set_(self, "checkpoint_every", _int("checkpoint_every", self.checkpoint_every, 0))
        set_(self, "max_reply_bytes", _int("max_reply_bytes", self.max_reply_bytes, 0))
        set_(self, "drain_timeout", _float("drain_timeout", self.drain_timeout, 0.0))
        for name in ("csv_path", "ledger_path", "checkpoint_dir", "resume_from"):
            set_(self, name, str(getattr(self, name)) if getattr(self, name) else None)
        set_(self, "replies_are_deltas", bool(self.replies_are_deltas))
        set_(self, "max_count_ratio", _float("max_count_ratio", self.max_count_ratio, 0.0))
        set_(self, "warmup", bool(self.warmup))
        if self.readmit_after is not None:
            set_(self, "readmit_after", _float("readmit_after", self.readmit_after, 0.0))
        from flwr_ext.compression.downlink import downlink_config

        set_(self, "downlink", downlink_config(self.downlink))
        set_(self, "downlink_seed", _int("downlink_seed", self.downlink_seed, 0))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names (the keyword arguments ``start`` accepts)."""
        return tuple(f.name for f in fields(cls))
