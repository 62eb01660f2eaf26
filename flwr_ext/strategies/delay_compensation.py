"""DelayCompensation: DC-ASGD correction of stale updates before FedBuff / FedAsync."""

from __future__ import annotations

from dataclasses import replace
from logging import INFO
from typing import Any

from flwr.common.logger import log

from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Timer, Update
from flwr_ext.staleness_conversion.compensate import dc_asgd


class DelayCompensation(AsyncStrategy):
    """Compensate the delay of stale updates to first order, then pass them on.

    Implementation based on Zheng et al., "Asynchronous Stochastic Gradient Descent with Delay
    Compensation", ICML 2017, eq. 6 (the diagonal approximation ``lambda g * g`` of the
    Hessian), applied to a client's update as in the baseline ``dc == 3`` of Wang, Gao et al.'s
    reference code (pittisl/FL-with-intertwined-heterogeneity, ``fixed.py``): an update
    ``Delta`` trained from ``w^{t-tau}`` reaches the inner strategy as

        Delta - lam * Delta * Delta * (w^t - w^{t-tau})        (element-wise)

    with its staleness unchanged (the inner strategy's staleness weight still applies; use
    ``constant`` for the compensation alone). Updates with staleness 0 pass unchanged.

    Parameters
    ----------
    inner : AsyncStrategy
        The strategy that aggregates (FedBuff, FedAsync).
    lam : float (default: 4.0)
        ``lambda`` (the reference's 4.0); ``>= 0``.
    """

    needs_weights = True  # the base model w^{t-tau} of every update must be kept

    def __init__(self, inner: AsyncStrategy, lam: float = 4.0) -> None:
        super().__init__(inner.weighted_by_key, inner.arrayrecord_key, inner.configrecord_key)
        if not lam >= 0:
            raise ValueError("lam must be >= 0")
        self.inner = inner
        self.lam = float(lam)

    @property
    def max_staleness(self) -> int | None:
        """The inner strategy's cut-off."""
        return self.inner.max_staleness

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> DC-ASGD delay compensation, lambda %s", self.lam)
        self.inner.summary()

    # ------------------------------------------------------------------ hooks
    def on_start(self, engine: EngineAPI) -> None:
        """The inner strategy's start."""
        self.inner.on_start(engine)

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """The inner strategy's choice."""
        return self.inner.configure_dispatch(engine, idle)

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Compensate a stale update's delta; the inner strategy aggregates it."""
        if update.staleness > 0 and self.lam > 0:
            base = update.base if update.base is not None else engine.model_at(update.version)
            delta = dc_asgd(update.delta(), engine.params, base, self.lam)
            update = replace(update, base=base, _delta=delta, _params=None)
        self.inner.on_update(engine, update)

    def on_timer(self, engine: EngineAPI, timer: Timer) -> None:
        """The inner strategy's timers."""
        self.inner.on_timer(engine, timer)

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """The inner strategy's handling."""
        self.inner.on_job_failed(engine, job, reason)

    def on_finish(self, engine: EngineAPI) -> None:
        """The inner strategy's end."""
        self.inner.on_finish(engine)

    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's state (the wrapper has none)."""
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, engine: EngineAPI, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(engine, state["inner"])
