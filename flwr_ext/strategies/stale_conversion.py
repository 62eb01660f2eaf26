"""StaleConversion: turn very stale updates into fresh ones before FedBuff / FedAsync see them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from logging import INFO
from typing import Any

from flwr.common.logger import log
from torch import nn

from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Params, Timer, Update
from flwr_ext.staleness_conversion import (
    Conversion,
    InversionConfig,
    LocalRecipe,
    check_model,
    check_privacy,
    convert_update,
)


@dataclass
class _Pending:
    """A conversion in progress: the stale update, the model it converts to, the result."""

    update: Update
    base: Params
    delta: Params
    current: Params
    version: int
    conversion: Conversion | None = None
    future: Future | None = None


class StaleConversion(AsyncStrategy):
    """Convert updates staler than a threshold by gradient inversion, then pass them on.

    Implementation based on Wang, Gao et al., "Tackling the Unlimited Staleness in Federated
    Learning with Intertwined Data and Device Heterogeneities", Sec. 4 (eq. 3-5): for an update
    ``Delta_i`` trained from ``w^{t-tau}`` with ``tau > threshold``, learn ``D_rec`` with
    ``S(w^{t-tau}; D_rec) - w^{t-tau} ~= Delta_i`` and hand the inner strategy the fresh update
    ``S(w^t; D_rec) - w^t`` (staleness: the versions committed while converting, usually 0).
    When the inversion's relative residual exceeds ``max_residual`` the raw stale update goes
    to the inner strategy instead (its own staleness weighting applies).

    Cost: the conversion's thread CPU time is measured. Under the virtual clock the converted
    update reaches the inner strategy only at ``start + seconds`` (a strategy timer; one
    conversion at a time, so conversions queue like on one server core); under the real clock
    (``background=True``) it runs in a worker thread and a timer polls for its result, so the
    engine's loop keeps pulling replies meanwhile.

    Parameters
    ----------
    inner : AsyncStrategy
        The strategy that aggregates (FedBuff, FedAsync).
    model_fn : callable
        Builds the clients' model (no BatchNorm / dropout: refused).
    recipe : LocalRecipe
        The clients' local training; ``steps`` is replaced by the update's reported
        ``num-steps`` when it has one.
    input_shape : tuple of int
        Shape of one input.
    num_classes : int
        Classes of the task.
    threshold : int (default: 10)
        Updates with staleness ``> threshold`` are converted.
    config : InversionConfig, optional
        Inversion settings.
    max_residual : float (default: 0.5)
        Acceptance threshold of the relative residual.
    background : bool (default: False)
        Run conversions in a worker thread (real clock).
    poll_interval : float (default: 0.05)
        Clock seconds between two checks of a background conversion.
    dp, secure_aggregation : bool
        Whether the run uses them: the conversion is then refused.
    """

    needs_weights = True  # the base model w^{t-tau} of every update must be kept

    def __init__(
        self,
        inner: AsyncStrategy,
        model_fn: Callable[[], nn.Module],
        recipe: LocalRecipe,
        input_shape: tuple[int, ...],
        num_classes: int,
        threshold: int = 10,
        config: InversionConfig | None = None,
        max_residual: float = 0.5,
        background: bool = False,
        poll_interval: float = 0.05,
        *,
        dp: bool = False,
        secure_aggregation: bool = False,
    ) -> None:
        super().__init__(inner.weighted_by_key, inner.arrayrecord_key, inner.configrecord_key)
        check_privacy(dp=dp, secure_aggregation=secure_aggregation)
        check_model(model_fn())
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        if not max_residual > 0:
            raise ValueError("max_residual must be > 0")
        if not poll_interval > 0:
            raise ValueError("poll_interval must be > 0")
        self.inner = inner
        self.model_fn = model_fn
        self.recipe = recipe
        self.input_shape = tuple(input_shape)
        self.num_classes = int(num_classes)
        self.threshold = int(threshold)
        self.config = config if config is not None else InversionConfig()
        self.max_residual = float(max_residual)
        self.background = bool(background)
        self.poll_interval = float(poll_interval)
        self._busy_until = 0.0
        self._pending: list[_Pending] = []
        self._log: list[dict[str, float]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._streams = itertools.count()

    @property
    def max_staleness(self) -> int | None:
        """The inner strategy's cut-off."""
        return self.inner.max_staleness

    @property
    def conversions(self) -> list[dict[str, float]]:
        """One row per conversion: version, node, staleness, residual, accepted, seconds."""
        return list(self._log)

    def summary(self) -> None:
        """Log the configuration."""
        log(
            INFO,
            "\t├──> convert staleness > %d (max residual %s)",
            self.threshold,
            self.max_residual,
        )
        self.inner.summary()

    # ------------------------------------------------------------------ hooks
    def on_start(self, engine: EngineAPI) -> None:
        """Reset the conversion state; start the inner strategy."""
        self._busy_until, self._pending, self._log = 0.0, [], []
        self.inner.on_start(engine)

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """The inner strategy's choice."""
        return self.inner.configure_dispatch(engine, idle)

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Pass a fresh-enough update on; start converting a stale one."""
        if update.staleness <= self.threshold:
            self.inner.on_update(engine, update)
            return
        base = update.base if update.base is not None else engine.model_at(update.version)
        pending = _Pending(update, base, update.delta(), engine.params, engine.version)
        self._pending.append(pending)
        if self.background:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert")
            pending.future = self._pool.submit(self._convert, pending)
            engine.set_timer(engine.now + self.poll_interval, pending)
            return
        pending.conversion = self._convert(pending)
        start = max(engine.now, self._busy_until)
        self._busy_until = start + pending.conversion.seconds
        engine.set_timer(self._busy_until, pending)

    def on_timer(self, engine: EngineAPI, timer: Timer) -> None:
        """A conversion is due (or a background one is polled); other timers: inner's."""
        pending = timer.payload
        if not isinstance(pending, _Pending):
            self.inner.on_timer(engine, timer)
            return
        if pending.future is not None:
            if not pending.future.done():
                engine.set_timer(engine.now + self.poll_interval, pending)
                return
            pending.conversion = pending.future.result()
        self._pending.remove(pending)
        self._deliver(engine, pending)

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """The inner strategy's handling."""
        self.inner.on_job_failed(engine, job, reason)

    def on_finish(self, engine: EngineAPI) -> None:
        """Conversions still running when the run ends are discarded; then the inner's end."""
        for pending in self._pending:
            engine.discard(pending.update, "stale conversion still running at the end")
        self._pending = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.inner.on_finish(engine)

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (the thread pool and the seed counter are not saved)."""
        return {
            "_busy_until": self._busy_until,
            "_log": self._log,
            "_pending": [p for p in self._pending if p.future is None],
            "inner": self.inner.state_dict(),
        }

    def load_state_dict(self, engine: EngineAPI, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._busy_until, self._log = state["_busy_until"], state["_log"]
        self._pending = state["_pending"]
        self.inner.load_state_dict(engine, state["inner"])

    # ------------------------------------------------------------------ conversion
    def _convert(self, pending: _Pending) -> Conversion:
        update = pending.update
        steps = update.num_steps if update.num_steps > 0 else self.recipe.steps
        return convert_update(
            self.model_fn,
            replace(self.recipe, steps=int(steps)),
            pending.base,
            pending.delta,
            pending.current,
            input_shape=self.input_shape,
            num_classes=self.num_classes,
            config=self.config,
            max_residual=self.max_residual,
            stream=next(self._streams),
        )

    def _deliver(self, engine: EngineAPI, pending: _Pending) -> None:
        conv, update = pending.conversion, pending.update
        assert conv is not None
        self._log.append(
            {
                "version": float(engine.version),
                "node": float(update.node_key),
                "staleness": float(update.staleness),
                "residual": conv.residual,
                "accepted": float(conv.accepted),
                "seconds": conv.seconds,
            }
        )
        if not conv.accepted:
            self.inner.on_update(engine, update)
            return
        fresh = replace(
            update,
            staleness=engine.version - pending.version,
            base=pending.current,
            _delta=conv.delta,
            _params=None,
        )
        self.inner.on_update(engine, fresh)

    @classmethod
    def from_run_config(cls, inner: AsyncStrategy, cfg: dict[str, Any]) -> StaleConversion:
        """Wrap ``inner`` from the ``stale-conversion-*`` run-config keys (the async-vision model).

        The recipe is the clients': ``local-steps`` (else each update's ``num-steps``),
        ``learning-rate``, ``batch-size``, ``momentum``. The model is
        :class:`~flwr_ext.vision.DigitsCNN` on ``stale-conversion-input-side``-pixel grey images
        in ``[0, 1]``. Refused when ``dp.target-epsilon`` / ``dp.noise-multiplier`` is positive or
        ``secure-aggregation`` is set; runs in the background under ``clock = "real"``.
        """
        from flwr_ext.vision import DigitsCNN

        side = int(cfg.get("stale-conversion-input-side", 8))
        return cls(
            inner,
            DigitsCNN,
            LocalRecipe(
                steps=max(int(cfg.get("local-steps", 0)), 1),
                lr=float(cfg.get("learning-rate", 0.05)),
                batch_size=int(cfg.get("batch-size", 16)),
                momentum=float(cfg.get("momentum", 0.0)),
            ),
            input_shape=(1, side, side),
            num_classes=10,
            threshold=int(cfg.get("stale-conversion-threshold", 10)),
            config=InversionConfig(
                num_samples=int(cfg.get("stale-conversion-samples", 64)),
                iterations=int(cfg.get("stale-conversion-iterations", 200)),
                lr=float(cfg.get("stale-conversion-lr", 0.1)),
                seed=int(cfg.get("seed", 0)),
            ),
            max_residual=float(cfg.get("stale-conversion-max-residual", 0.5)),
            background=str(cfg.get("clock", "virtual")) == "real",
            dp=float(cfg.get("dp.target-epsilon", 0) or 0) > 0
            or float(cfg.get("dp.noise-multiplier", 0) or 0) > 0,
            secure_aggregation=bool(cfg.get("secure-aggregation", False)),
        )
