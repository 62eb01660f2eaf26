"""The base of the asynchronous strategies: hooks in the order the engine calls them, and start.

A strategy subclasses :class:`AsyncStrategy` and overrides some hooks; every hook receives the
:class:`~flwr_ext.asyncfl.types.EngineAPI` (``now``, ``version``, ``params``, ``nodes``,
``model_at``, ``commit``, ``discard``, ``set_timer``, ``cancel_timer``), never the engine's
internals. See docs/asyncfl.md for the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from flwr_ext.asyncfl.clock import RealClock, VirtualClock
from flwr_ext.asyncfl.options import EngineOptions
from flwr_ext.asyncfl.records import AsyncResult
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Timer, Update

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class AsyncStrategy:
    """Base of the strategies run by :class:`~flwr_ext.asyncfl.engine.AsyncEngine`.

    Parameters
    ----------
    weighted_by_key : str or None
        Reply metric holding the sample count the strategy weights updates by (Flower's
        name for it); ``None``: the strategy does not weight by samples (the count is then
        optional). A count that is missing, not a number, not finite or not > 0 is rejected.
    arrayrecord_key, configrecord_key : str
        Keys of the records in train instructions (as Flower's FedAvg).
    """

    #: Whether the rule uses the clients' full weights (FedAsync mixes models); strategies
    #: that use only deltas let the server drop a model version as soon as no job needs it.
    needs_weights: bool = False

    def __init__(
        self,
        weighted_by_key: str | None = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        self.weighted_by_key = weighted_by_key
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key

    @property
    def max_staleness(self) -> int | None:
        """Updates staler than this are discarded (from the strategy's staleness function)."""
        staleness = getattr(self, "staleness", None)
        return getattr(staleness, "max_staleness", None)

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t└──> %r", self)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"

    # ------------------------------------------------------------------ entry point
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        clock: VirtualClock | RealClock | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Run until ``num_rounds`` server model updates (or ``max_time`` / ``wall_timeout``).

        Same signature and return type as :meth:`flwr.serverapp.strategy.Strategy.start`;
        a "round" is one server model update and ``timeout`` the per-job wall timeout.
        ``evaluate_config`` is accepted for compatibility (no client-side evaluation).
        ``clock`` defaults to :class:`~flwr_ext.asyncfl.clock.RealClock`; every other keyword
        is a setting of :class:`~flwr_ext.asyncfl.options.EngineOptions` (``max_time``,
        ``eval_every``, ``max_concurrency``, ``checkpoint_dir``, ``resume_from``, ...), checked
        before the first message is sent.
        """
        from flwr_ext.asyncfl.engine import AsyncEngine

        opts = EngineOptions(num_rounds=num_rounds, timeout=timeout, **options)
        engine = AsyncEngine(
            self,
            grid,
            clock=clock if clock is not None else RealClock(),
            options=opts,
            train_config=train_config,
            evaluate_fn=evaluate_fn,
        )
        result = engine.run(initial_arrays)
        if opts.csv_path:
            result.write_csv(opts.csv_path)
        if opts.ledger_path:
            result.write_ledger(opts.ledger_path)
        return result

    # ------------------------------------------------------------------ hooks, in run order
    def on_start(self, engine: EngineAPI) -> None:
        """Called once, after nodes are discovered and version 0 is evaluated."""

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Nodes to send a job to now, with extra config. Default: all ``idle`` nodes."""
        return [(node, {}) for node in idle]

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Handle one valid update (buffer it, or ``engine.commit`` / ``engine.discard``)."""
        raise NotImplementedError

    def on_timer(self, engine: EngineAPI, timer: Timer) -> None:
        """A timer set with ``engine.set_timer`` is due."""

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """A job ended without a valid update."""

    def on_finish(self, engine: EngineAPI) -> None:
        """Called once when the run ends (e.g. to discard a partial buffer)."""

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """The strategy's mutable run state, for a checkpoint.

        Default: every attribute whose name starts with ``_`` (constructor parameters are
        public and are not saved: the resumed strategy is constructed with the same ones).
        Values may reference the engine's objects (updates, nodes, timers): they are pickled
        together with the engine's state, so they stay shared after loading.
        """
        return {k: v for k, v in vars(self).items() if k.startswith("_")}

    def load_state_dict(self, engine: EngineAPI, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (called instead of :meth:`on_start` on resume)."""
        for key, value in state.items():
            setattr(self, key, value)
