"""FedFix: aggregate on a fixed time grid, every client weighted by its importance."""

from __future__ import annotations

import math
from logging import INFO
from typing import Any

from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import weighted_delta
from flwr_ext.asyncfl.server_opt import Plain, ServerOptimizer
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, NodeState, Timer, Update

WEIGHTS = ("fedfix", "asynchronous")


class FedFix(AsyncStrategy):
    """FedFix (Fraboni, Vidal, Kameni and Lorenzi, JMLR 2023).

    Implementation based on "A General Theory for Federated Optimization with Asynchronous and
    Heterogeneous Clients Updates", JMLR 24 (2023), https://arxiv.org/abs/2206.10189, Sec. 5
    (FedFix) and the authors' code (Accenture/Labs-Federated-Learning, ``FL/server.py``,
    ``aggregation`` and ``clients_importances``). The server aggregates at every tick
    ``n * dt`` over the set ``S_n`` of clients whose work finished by then:

        x <- x + eta_g * sum_{i in S_n} d_i (y_i - x_{sent_i}),   d_i = ceil(tau_i / dt) p_i

    and only the clients of ``S_n`` receive the new model (the others keep computing); a client
    that finished between two ticks waits, idle, for the next one. A client with compute time
    ``tau_i`` is aggregated once every ``ceil(tau_i / dt)`` ticks, so ``d_i`` makes its
    importance ``p_i`` per tick the same whatever its speed (the paper's Theorem 2 then gives
    the surrogate objective equal to the federated one). ``weights="asynchronous"`` uses the
    paper's weights for asynchronous FedAvg instead, ``d_i = (sum_j 1/tau_j) tau_i p_i``
    (``clients_importances``, scheme ``Async_weight``), for the comparison the paper makes.

    ``tau_i`` is not known to a deployed server: it is estimated online as an exponential
    moving average of the node's observed job durations (``update.duration``, dispatch to
    reply, so it includes the transfers), ``tau <- (1 - mu) tau + mu duration`` with the
    first duration as the start value. Nodes that have not replied yet do not enter the sum
    of the asynchronous weights.

    The weights of one tick can sum to more than 1 (a slow node counts ``ceil(tau_i / dt)``
    times its importance, and the whole fleet can finish in the same tick), so ``eta_g``
    must be tuned as in the paper: on digits with 6 nodes, two of them 10x slower
    (``intertwined``), ``eta_g = 1`` diverged and ``eta_g = 0.35`` learned (metric
    ``sum-weights`` of every version shows the tick's total). The asynchronous weights are
    the paper's for one update per aggregation; on a grid they hold when ``dt`` is short
    enough that a tick rarely holds more than one update (with ``dt = 1`` and several
    updates per tick they diverged at ``eta_g = 1`` in the same run).

    Parameters
    ----------
    dt : float
        Tick period ``Delta t`` in clock seconds (> 0).
    server_lr : float (default: 1.0)
        ``eta_g`` (used when ``server_opt`` is ``None``: ``Plain(server_lr)``).
    weights : {"fedfix", "asynchronous"} (default: "fedfix")
        ``d_i`` as above.
    tau_momentum : float (default: 0.5)
        ``mu`` in (0, 1] of the duration estimate (1: the last duration).
    weighted_by_key : str or None (default: None)
        ``p_i``: ``None``: ``1/M`` over the ``M`` nodes not retired; a reply metric
        (``"num-examples"``): ``n_i / sum_j n_j`` over the nodes that have reported a count.
    server_opt : ServerOptimizer or None (default: None)
        Applies the aggregated step; refused together with a ``server_lr != 1``.
    arrayrecord_key, configrecord_key : str
        As in Flower's FedAvg.
    """

    def __init__(
        self,
        dt: float = 1.0,
        server_lr: float = 1.0,
        weights: str = "fedfix",
        tau_momentum: float = 0.5,
        weighted_by_key: str | None = None,
        server_opt: ServerOptimizer | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        if not (math.isfinite(dt) and dt > 0.0):
            raise ValueError(f"dt must be > 0, got {dt!r}")
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if not 0.0 < tau_momentum <= 1.0:
            raise ValueError(f"tau_momentum must be in (0, 1], got {tau_momentum!r}")
        if server_opt is not None and server_lr != 1.0:
            raise ValueError("give either server_opt or server_lr, not both")
        self.dt = float(dt)
        self.server_lr = float(server_lr)
        self.weights = weights
        self.tau_momentum = float(tau_momentum)
        self._server_opt: ServerOptimizer = server_opt or Plain(self.server_lr)
        self._new_state(0.0)

    @property
    def server_opt(self) -> ServerOptimizer:
        """The server optimizer (its state is checkpointed with the strategy)."""
        return self._server_opt

    def _new_state(self, t0: float) -> None:
        self._t0 = t0
        self._tick = 0  # ticks fired
        self._timer: Timer | None = None
        self._held: dict[int, Update] = {}  # node rank -> finished update, waiting for a tick
        self._tau: dict[int, float] = {}  # node rank -> estimated job duration
        self._counts: dict[int, float] = {}  # node rank -> last reported sample count

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> dt: %s, weights: %s", self.dt, self.weights)
        log(INFO, "\t└──> server optimizer: %r", self._server_opt)

    # ------------------------------------------------------------------ hooks, in run order
    def on_start(self, engine: EngineAPI) -> None:
        """Fresh state; the first tick at ``now + dt``."""
        self._new_state(engine.now)
        self._server_opt.reset()
        self._timer = engine.set_timer(self._t0 + self.dt, 1)

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Every idle node except those holding an update for the next tick.

        So the nodes of a tick's set get the new model right after the tick, and new nodes,
        nodes whose job failed and nodes whose push failed get the current one at once.
        """
        return [(node, {}) for node in idle if node.rank not in self._held]

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Update the node's duration estimate; hold the update until the next tick."""
        rank = update.job.node.rank
        mu, d = self.tau_momentum, float(update.duration)
        self._tau[rank] = d if rank not in self._tau else (1.0 - mu) * self._tau[rank] + mu * d
        self._counts[rank] = float(update.num_examples)
        old = self._held.pop(rank, None)
        if old is not None:  # cannot happen with one job per node; say so if it does
            engine.discard(old, "fedfix superseded by a newer update of the node")
        self._held[rank] = update

    def on_timer(self, engine: EngineAPI, timer: Timer) -> None:
        """Tick ``n``: aggregate the finished set ``S_n``, release its nodes, set tick ``n+1``."""
        self._tick = int(timer.payload)
        self._timer = engine.set_timer(self._t0 + (self._tick + 1) * self.dt, self._tick + 1)
        if not self._held:
            return
        held, self._held = self._held, {}
        ranks = sorted(held)
        updates = [held[r] for r in ranks]
        coeffs = self.coefficients(engine, ranks)
        step = weighted_delta([u.delta_terms() for u in updates], coeffs)
        params = self._server_opt.step(engine.params, step)
        engine.commit(
            params,
            updates,
            {"tick": self._tick, "sum-weights": float(sum(coeffs))},
        )

    def on_finish(self, engine: EngineAPI) -> None:
        """Updates waiting for a tick were never applied."""
        for update in self._held.values():
            engine.discard(update, "fedfix run ended before the next tick")
        self._held = {}
        if self._timer is not None:
            engine.cancel_timer(self._timer)

    # ------------------------------------------------------------------ weights
    def importance(self, engine: EngineAPI, rank: int) -> float:
        """``p_i``: ``1/M`` (``weighted_by_key`` unset) or ``n_i / sum_j n_j``."""
        if self.weighted_by_key is None:
            m = sum(1 for n in engine.nodes.values() if not n.retired) or 1
            return 1.0 / m
        return self._counts[rank] / (sum(self._counts.values()) or 1.0)

    def coefficients(self, engine: EngineAPI, ranks: list[int]) -> list[float]:
        """``d_i`` of the nodes ``ranks`` (times ``p_i``), as in the docstring."""
        if self.weights == "fedfix":
            # the tiny tolerance keeps a duration of exactly k*dt (plus rounding) at k ticks
            return [
                max(1, math.ceil(self._tau[r] / self.dt - 1e-9)) * self.importance(engine, r)
                for r in ranks
            ]
        inv = sum(1.0 / t for t in self._tau.values())
        return [inv * self._tau[r] * self.importance(engine, r) for r in ranks]
