"""FedAsync: mix every arriving model into the global one, weighted by staleness."""

from __future__ import annotations

from logging import INFO

from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import mix
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Update
from flwr_ext.staleness import Staleness, polynomial


class FedAsync(AsyncStrategy):
    """Asynchronous Federated Optimization (FedAsync).

    Implementation based on Xie, Koyejo and Gupta, "Asynchronous Federated Optimization",
    OPT workshop 2020, https://arxiv.org/abs/1903.03934. Each update ``x_new`` trained on the
    model of version ``v`` is applied as soon as it arrives at server version ``t``:

        x_t = (1 - a_t) x_{t-1} + a_t x_new,    a_t = alpha * s(t - v)        (Alg. 1, eq. 2)

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
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        if not 0.0 < alpha <= 1.0:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = float(alpha)
        self.staleness = staleness if staleness is not None else polynomial(0.5)

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> alpha: %s", self.alpha)
        log(INFO, "\t└──> staleness: %s", self.staleness)

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Apply one update immediately (Alg. 1, server lines 4-6)."""
        weight = self.staleness(update.staleness)
        if weight <= 0.0:
            engine.discard(update, "too stale", str(update.staleness))
            return
        alpha_t = self.alpha * weight
        engine.commit(mix(engine.params, update.params, alpha_t), [update], {"alpha-t": alpha_t})
