"""FedAvg under the engine's clock: the synchronous baseline, with time accounted."""

from __future__ import annotations

import math
import random
from logging import INFO
from typing import Any

from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import add_scaled, weighted_delta
from flwr_ext.asyncfl.profiles import keyed_rng
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Update


class FedAvgTimed(AsyncStrategy):
    """Synchronous Federated Averaging, timed by the same clock as the async strategies.

    Implementation based on McMahan et al., "Communication-Efficient Learning of Deep Networks
    from Decentralized Data", AISTATS 2017, https://arxiv.org/abs/1602.05629 (Alg. 1). A round
    samples ``max(fraction_train * N, min_train_nodes)`` of the idle nodes, waits for every one
    of them (or its failure), and sets ``x <- sum_i n_i y_i / sum_i n_i``. Under a
    :class:`~flwr_ext.asyncfl.clock.VirtualClock` a round therefore lasts as long as its slowest
    sampled client, which makes time-to-accuracy comparable with FedAsync / FedBuff / FedCompass.
    This is the only strategy here with a round barrier.

    With ``over_selection = r > 1`` a round is sent to ``ceil(r K)`` nodes and aggregated as
    soon as the first ``K`` replied (Bonawitz et al., "Towards Federated Learning at Scale",
    SysML 2019, Sec. 4: over-selection by 30%); the replies of the others are discarded when
    they come, as wasted work (reason ``fedavg over-selection``).

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of connected nodes sampled per round.
    min_train_nodes : int (default: 2)
        Minimum nodes per round.
    seed : int (default: 0)
        Seeds the sampling (keyed by ``SeedSequence([seed, version, 5])``, over nodes sorted
        by key).
    over_selection : float (default: 1.0)
        ``r >= 1``: nodes sent per round over nodes aggregated (1.3 in Bonawitz et al.).
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        min_train_nodes: int = 2,
        seed: int = 0,
        over_selection: float = 1.0,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        self.fraction_train = float(fraction_train)
        self.min_train_nodes = int(min_train_nodes)
        self.seed = int(seed)
        if not over_selection >= 1.0:
            raise ValueError(f"over_selection must be >= 1, got {over_selection!r}")
        self.over_selection = float(over_selection)
        self._target = 0
        self._late: set[int] = set()  # over-selected nodes still out after their round closed
        self._waiting: set[int] = set()
        self._replies: list[Update] = []

    def summary(self) -> None:
        """Log the configuration."""
        log(
            INFO,
            "\t└──> fraction_train %s, min nodes %d",
            self.fraction_train,
            self.min_train_nodes,
        )

    def on_start(self, engine: EngineAPI) -> None:
        """No round in progress."""
        self._waiting, self._replies, self._late = set(), [], set()

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Start a round when the previous one is complete (the barrier)."""
        if self._waiting or not idle:
            return []
        active = [n for n in engine.nodes.values() if not n.retired]
        size = max(int(len(active) * self.fraction_train), self.min_train_nodes)
        size = min(size, len(idle))
        sent = min(len(idle), math.ceil(self.over_selection * size - 1e-9))
        rng = random.Random(int(keyed_rng(self.seed, engine.version, 5).integers(2**63)))
        chosen = sorted(rng.sample(idle, sent), key=lambda n: n.ident)
        self._waiting = {n.rank for n in chosen}
        self._target = size
        self._replies = []
        return [(n, {}) for n in chosen]

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Collect one reply; aggregate when the cohort (or its first ``K``) is in."""
        rank = update.job.node.rank
        if rank in self._late:
            self._late.discard(rank)
            engine.discard(update, "fedavg over-selection", "not among the first K")
            return
        self._replies.append(update)
        self._waiting.discard(rank)
        self._maybe_aggregate(engine)

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """A failed client leaves the cohort (as Flower's FedAvg drops failures)."""
        if job.node.rank in self._late:
            self._late.discard(job.node.rank)
            return
        self._waiting.discard(job.node.rank)
        self._maybe_aggregate(engine)

    def _maybe_aggregate(self, engine: EngineAPI) -> None:
        if self._waiting and len(self._replies) < self._target:
            return
        self._late |= self._waiting
        self._waiting = set()
        replies, self._replies = self._replies, []
        if not replies:
            return
        total = sum(u.num_examples for u in replies) or 1.0
        step = weighted_delta(
            [u.delta_terms() for u in replies], [u.num_examples / total for u in replies]
        )
        engine.commit(add_scaled(engine.params, step, 1.0), replies)
