"""FedBuff: buffered asynchronous aggregation of staleness-scaled client deltas."""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import weighted_delta
from flwr_ext.asyncfl.server_opt import Momentum, Plain, ServerOptimizer
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Update
from flwr_ext.staleness import Staleness, polynomial


class FedBuff(AsyncStrategy):
    """Federated Learning with Buffered Asynchronous Aggregation (FedBuff).

    Implementation based on Nguyen et al., "Federated Learning with Buffered Asynchronous
    Aggregation", AISTATS 2022, https://arxiv.org/abs/2106.06639, Algorithm 1. With
    ``delta_i = y_i - x_{v_i}`` (client model minus the model it was sent):

        buffer += s(t - v_i) * delta_i                      (Alg. 1, line 9)
        after K updates:  x <- x + eta_g * buffer / K       (lines 11-13)

    With ``weighted_by_key`` set the buffer average is weighted by the clients' sample counts
    (``sum_i n_i s_i delta_i / sum_i n_i``) instead of ``1/K``: with ``K`` = all nodes, constant
    staleness and ``server_lr = 1`` this equals FedAvg's aggregate on the same replies.
    Optional server momentum (``x <- x + eta_g m``, ``m <- beta m + mean delta``) follows
    FedBuff's Sec. 5 / Reddi et al. 2021 (FedAvgM on the server). The server step is a
    :mod:`~flwr_ext.asyncfl.server_opt` optimizer: ``server_lr`` / ``server_momentum`` build
    ``Plain(server_lr)`` or ``Momentum(server_lr, server_momentum)`` (bit-identical to the
    former built-in momentum); ``server_opt`` takes any other (Adaptive Braking, Nesterov).

    Parameters
    ----------
    buffer_size : int (default: 10)
        ``K``, updates per server step.
    server_lr : float (default: 1.0)
        ``eta_g``.
    staleness : Staleness (default: polynomial, a = 0.5, i.e. ``1/sqrt(1+s)`` as in the paper)
        A weight of 0 (beyond ``max_staleness``) discards the update.
    server_momentum : float (default: 0.0)
        ``beta``; 0 disables momentum.
    weighted_by_key : str or None (default: None)
        ``None``: the paper's uniform ``1/K``; e.g. ``"num-examples"``: sample-weighted.
    server_opt : ServerOptimizer or None (default: None)
        Applies the buffer average ``s``: ``x <- server_opt.step(x, s)``. ``None``: from
        ``server_lr`` and ``server_momentum``; given together with a ``server_lr != 1`` or a
        ``server_momentum > 0`` it is refused (two settings of one thing).
    """

    def __init__(
        self,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        staleness: Staleness | None = None,
        server_momentum: float = 0.0,
        weighted_by_key: str | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.buffer_size = int(buffer_size)
        self.server_lr = float(server_lr)
        self.staleness = staleness if staleness is not None else polynomial(0.5)
        self.server_momentum = float(server_momentum)
        self.sample_weighted = weighted_by_key is not None
        if server_opt is not None and (self.server_lr != 1.0 or self.server_momentum > 0.0):
            raise ValueError("give either server_opt or server_lr / server_momentum, not both")
        if server_opt is None:
            server_opt = (
                Momentum(self.server_lr, self.server_momentum)
                if self.server_momentum > 0.0
                else Plain(self.server_lr)
            )
        self._buffer: list[tuple[Update, float]] = []
        self._server_opt: ServerOptimizer = server_opt
        # the optimizer's buffer (momentum), mirrored under its former name for checkpoints
        self._momentum: dict[str, np.ndarray] | None = None

    @property
    def server_opt(self) -> ServerOptimizer:
        """The server optimizer (its state is checkpointed with the strategy)."""
        return self._server_opt

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> K: %d, server lr: %s", self.buffer_size, self.server_lr)
        log(INFO, "\t├──> server optimizer: %r", self._server_opt)
        log(INFO, "\t└──> staleness: %s", self.staleness)

    def on_start(self, engine: EngineAPI) -> None:
        """Empty the buffer, reset the server optimizer."""
        self._buffer, self._momentum = [], None
        self._server_opt.reset()

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Buffer a staleness-weighted delta; flush after K (Alg. 1, lines 8-13)."""
        weight = self.staleness(update.staleness)
        if weight <= 0.0:
            engine.discard(update, "too stale", str(update.staleness))
            return
        self._buffer.append((update, weight))
        if len(self._buffer) >= self.buffer_size:
            self.flush(engine)

    def on_finish(self, engine: EngineAPI) -> None:
        """A partial buffer is never applied (FedBuff steps only on K updates): say so."""
        for update, _ in self._buffer:
            engine.discard(update, "fedbuff run ended before the buffer was full")
        self._buffer = []

    def flush(self, engine: EngineAPI) -> None:
        """One server step from the buffered updates."""
        updates = [u for u, _ in self._buffer]
        if self.sample_weighted:
            total = sum(u.num_examples for u in updates) or 1.0
            coeffs = [w * u.num_examples / total for u, w in self._buffer]
        else:
            coeffs = [w / len(updates) for _, w in self._buffer]
        step = weighted_delta([u.delta_terms() for u in updates], coeffs)
        params = self._server_opt.step(engine.params, step)
        self._momentum = getattr(self._server_opt, "buffer", None)
        self._buffer = []
        engine.commit(params, updates)
