"""FedAsync: mix every arriving model into the global one, weighted by staleness."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import Difference, mix, weighted_delta
from flwr_ext.asyncfl.server_opt import ServerOptimizer
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Update
from flwr_ext.staleness import Staleness, polynomial


class FedAsync(AsyncStrategy):
    """Asynchronous Federated Optimization (FedAsync).

    Implementation based on Xie, Koyejo and Gupta, "Asynchronous Federated Optimization",
    OPT workshop 2020, https://arxiv.org/abs/1903.03934. Each update ``x_new`` trained on the
    model of version ``v`` is applied as soon as it arrives at server version ``t``:

        x_t = (1 - a_t) x_{t-1} + a_t x_new,    a_t = alpha * s(t - v)        (Alg. 1, eq. 2)

    i.e. ``x_t = x_{t-1} + a_t (x_new - x_{t-1})``. With a ``server_opt`` that mix step
    ``a_t (x_new - x_{t-1})`` is handed to the optimizer instead,
    ``x_t = server_opt.step(x_{t-1}, a_t (x_new - x_{t-1}))`` (``Plain(1.0)`` is the mix up to
    rounding; ``None`` keeps the exact mix).

    Parameters
    ----------
    alpha : float (default: 0.6)
        Mixing hyper-parameter ``alpha`` in (0, 1].
    staleness : Staleness (default: polynomial, a = 0.5)
        The staleness function ``s`` (see :mod:`flwr_ext.staleness`); a weight of 0 (beyond
        its ``max_staleness``) discards the update.
    weighted_by_key : str or None (default: None)
        FedAsync does not weight by sample counts; set it to require a valid count anyway.
    arrayrecord_key, configrecord_key : str
        As in Flower's FedAvg.
    server_opt : ServerOptimizer or None (default: None)
        Optimizer of the mix step (momentum, Adaptive Braking, ...); its state is
        checkpointed with the strategy.
    """

    #: The mix uses the client's full weights ``x_new`` (not only its delta).
    needs_weights = True

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: Staleness | None = None,
        weighted_by_key: str | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        server_opt: ServerOptimizer | None = None,
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = float(alpha)
        self.staleness = staleness if staleness is not None else polynomial(0.5)
        self._server_opt = server_opt

    @property
    def server_opt(self) -> ServerOptimizer | None:
        """The optimizer of the mix step (``None``: the paper's mix)."""
        return self._server_opt

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> alpha: %s", self.alpha)
        log(INFO, "\t├──> server optimizer: %r", self._server_opt)
        log(INFO, "\t└──> staleness: %s", self.staleness)

    def on_start(self, engine: EngineAPI) -> None:
        """Reset the server optimizer's state."""
        if self._server_opt is not None:
            self._server_opt.reset()

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Apply one update immediately (Alg. 1, server lines 4-6)."""
        weight = self.staleness(update.staleness)
        if weight <= 0.0:
            engine.discard(update, "too stale", str(update.staleness))
            return
        alpha_t = self.alpha * weight
        if self._server_opt is None:
            params = mix(engine.params, update.params, alpha_t)
        else:
            step = weighted_delta([Difference(update.params, engine.params)], [alpha_t])
            params = self._server_opt.step(engine.params, step)
        engine.commit(params, [update], {"alpha-t": alpha_t})
