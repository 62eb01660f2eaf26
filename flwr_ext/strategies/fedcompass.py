"""FedCompass: semi-asynchronous FL with a computing-power-aware scheduler.

Li et al., "FedCompass: Efficient Cross-Silo Federated Learning on Heterogeneous Client
Devices Using a Computing Power-Aware Scheduler", ICLR 2024 (arXiv:2309.14675).

The scheduling logic (Algorithms 1 and 2 of the paper) lives in the Flower-free
:class:`~flwr_ext.asyncfl.compass_scheduler.CompassScheduler`; this module wires it to the
asynchronous engine (:mod:`flwr_ext.asyncfl.engine`): replies become ``on_arrival`` events,
group deadlines become engine timers on the same clock, and the scheduler's actions become
``engine.commit`` (a group aggregation) and jobs with ``local-steps`` in their config.
"""

from __future__ import annotations

from typing import Any

from flwr_ext.asyncfl.aggregate import add_scaled, weighted_delta
from flwr_ext.asyncfl.compass_scheduler import Aggregate, CompassScheduler, Dispatch
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Timer, Update
from flwr_ext.staleness import StalenessFn, from_run_config, polynomial

#: Run-config keys read by :meth:`FedCompass.from_run_config` and their defaults.
RUN_CONFIG_KEYS: dict[str, Any] = {
    "compass-q-min": 20,
    "compass-q-max": 100,
    "compass-lambda": 1.5,
    "compass-speed-momentum": 0.9,
    "compass-weighting": "num-examples",
    "server-lr": 1.0,
}


def _weighted_by_key(weighting: str) -> str | None:
    """``compass-weighting``: ``uniform`` (``p_i = 1/N``) or the sample-count metric's name."""
    return None if weighting == "uniform" else weighting


class FedCompass(AsyncStrategy):
    """FedCompass (Li et al., ICLR 2024) on Flower's Grid.

    Each client gets a number of local steps ``Q`` in ``[q_min, q_max]`` chosen from its
    estimated time per step so that the members of an *arrival group* finish together
    (Alg. 2); the server aggregates a group when all its members are back or at the group's
    deadline (``latest_time_factor`` times the expected duration), merges updates that came
    after their group's deadline into the next aggregation, and weights every update by
    ``server_lr * p_i * S(staleness)`` with ``S(u) = (1 + u)^-a`` (Alg. 1, Sec. 3.2):

        ``w <- w + sum_i server_lr * p_i * S(t - tau_i) * (x_i - w_{tau_i})``

    Clients receive ``local-steps`` (int) in the train config; a ClientApp that ignores it
    still works (the speed estimate then measures time per assigned step). Members that
    arrived on time wait, idle, until their group is aggregated.

    Parameters
    ----------
    q_min, q_max : int
        Bounds on local steps (paper defaults 20 and 100).
    latest_time_factor : float
        ``lambda``: a group's deadline is ``lambda`` times its expected duration (1.5 in
        the authors' configuration; must be >= 1).
    speed_momentum : float
        ``mu``: ``s <- (1 - mu) s + mu s_observed`` for the seconds-per-step estimate.
    staleness : callable, optional
        ``S(u)``; default :func:`flwr_ext.staleness.polynomial` with ``a = 0.5``. An update
        whose weight is 0 (a cut-off) is discarded, not aggregated.
    server_lr : float
        Global step size ``eta``.
    weighted_by_key : str or None
        ``p_i``: ``n_i / sum_j n_j`` with ``n_i`` this reply metric (Flower's name; default
        ``num-examples``), or ``1 / N`` when ``None``.
    arrayrecord_key, configrecord_key : str
        As in Flower's FedAvg.

    Notes
    -----
    ``start`` is the engine's (:meth:`AsyncStrategy.start`): Flower's ``Strategy.start``
    signature plus ``clock``, ``max_time``, ``eval_every``, ... keywords. One "round" is one
    server model version. The staleness stored for an applied update (its record and the
    round's metrics) is taken when its group is aggregated, which is what the weight uses.
    """

    def __init__(
        self,
        q_min: int = 20,
        q_max: int = 100,
        latest_time_factor: float = 1.5,
        speed_momentum: float = 0.9,
        staleness: StalenessFn | None = None,
        server_lr: float = 1.0,
        weighted_by_key: str | None = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        self.q_min = int(q_min)
        self.q_max = int(q_max)
        self.latest_time_factor = float(latest_time_factor)
        self.speed_momentum = float(speed_momentum)
        self.staleness = staleness if staleness is not None else polynomial(0.5)
        self.server_lr = float(server_lr)
        self._new_scheduler()  # validates the parameters now, not at start

    @classmethod
    def from_run_config(cls, cfg: dict[str, Any]) -> FedCompass:
        """Build from a Flower run config (keys and defaults: :data:`RUN_CONFIG_KEYS`).

        ``compass-q-min`` / ``compass-q-max`` (local-step bounds), ``compass-lambda``
        (deadline factor), ``compass-speed-momentum``, ``compass-weighting``
        (``num-examples`` or ``uniform``), ``server-lr``, and the shared staleness keys
        ``staleness`` / ``staleness-a`` / ``staleness-b`` / ``max-staleness`` (< 0: none).
        """

        def get(key: str) -> Any:
            default = RUN_CONFIG_KEYS[key]
            return type(default)(cfg.get(key, default))

        return cls(
            q_min=get("compass-q-min"),
            q_max=get("compass-q-max"),
            latest_time_factor=get("compass-lambda"),
            speed_momentum=get("compass-speed-momentum"),
            staleness=from_run_config(cfg),
            server_lr=get("server-lr"),
            weighted_by_key=_weighted_by_key(get("compass-weighting")),
        )

    def _new_scheduler(self) -> None:
        self._scheduler = CompassScheduler(
            q_min=self.q_min,
            q_max=self.q_max,
            latest_time_factor=self.latest_time_factor,
            speed_momentum=self.speed_momentum,
            staleness_fn=self.staleness,
            server_lr=self.server_lr,
            weighting="uniform" if self.weighted_by_key is None else "num-examples",
        )
        self._ready: dict[int, Dispatch] = {}  # node rank -> job to send at the next dispatch
        self._sent: set[int] = set()  # node ranks handed to the engine, no reply/failure yet
        self._timers: dict[int, Timer] = {}  # group id -> its deadline timer

    @property
    def scheduler(self) -> CompassScheduler:
        """The scheduler of the current (or last) run."""
        return self._scheduler

    # ------------------------------------------------------------------ hooks, in run order
    def on_start(self, engine: EngineAPI) -> None:
        """Fresh scheduler for this run: every node starts with a ``q_max`` probe job."""
        self._new_scheduler()

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Send the jobs the scheduler decided; new nodes get a probe job (Alg. 1)."""
        sched = self._scheduler
        for node in idle:
            nid = node.rank
            if nid in self._sent:
                # Handed over last time but still idle without a reply or failure: the
                # push failed. Tell the scheduler, then give the node a new job.
                self._sent.discard(nid)
                self._run(engine, sched.on_failure(nid, engine.now))
            if nid not in self._ready and not sched.busy(nid):
                self._ready[nid] = sched.assign(nid, engine.now)
        self._sync_timers(engine)
        out = []
        for node in idle:
            job = self._ready.pop(node.rank, None)
            if job is not None:
                self._sent.add(node.rank)
                out.append((node, {"local-steps": int(job.local_steps)}))
        return out

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """An arrival (Alg. 1): single update, wait for the group, or late buffer."""
        nid = update.job.node.rank
        self._sent.discard(nid)
        if not self._scheduler.has_job(nid):  # e.g. a reply after a reported failure
            engine.discard(update, "fedcompass no scheduled job for this node")
            return
        actions = self._scheduler.on_arrival(
            nid, engine.now, payload=update, num_examples=update.num_examples
        )
        self._run(engine, actions)

    def on_timer(self, engine: EngineAPI, timer: Timer) -> None:
        """A group deadline: aggregate whoever arrived, re-dispatch them."""
        self._timers.pop(timer.payload, None)
        self._run(engine, self._scheduler.on_deadline(engine.now))

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """Drop the job from its group (which may complete now); re-dispatch a live node."""
        nid = job.node.rank
        self._sent.discard(nid)
        if not self._scheduler.has_job(nid):
            return
        self._run(engine, self._scheduler.on_failure(nid, engine.now))
        if not job.node.retired:
            self._ready[nid] = self._scheduler.assign(nid, engine.now)
            self._sync_timers(engine)

    def on_finish(self, engine: EngineAPI) -> None:
        """Updates still waiting for a group (or buffered late) were never applied."""
        for _, update in self._scheduler.held():
            engine.discard(update, "fedcompass run ended before its group aggregated")
        for timer in self._timers.values():
            engine.cancel_timer(timer)
        self._timers.clear()

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Scheduler state (speed estimates, groups, buffer, jobs), pending jobs, timers.

        The scheduler is keyed by the engine's node ``rank`` (stable across a resume, unlike
        Flower's node ids); its staleness function is a parameter and is not saved.
        """
        sched = {k: v for k, v in vars(self._scheduler).items() if k != "staleness_fn"}
        return {
            "scheduler": sched,
            "ready": self._ready,
            "sent": self._sent,
            "timers": self._timers,
        }

    def load_state_dict(self, engine: EngineAPI, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a fresh scheduler built from this instance's params."""
        self._new_scheduler()
        vars(self._scheduler).update(state["scheduler"])
        self._ready = state["ready"]
        self._sent = state["sent"]
        self._timers = state["timers"]

    # ------------------------------------------------------------------ internals
    def _run(self, engine: EngineAPI, actions: list[Aggregate | Dispatch]) -> None:
        for action in actions:
            if isinstance(action, Aggregate):
                self._aggregate(engine, action)
            else:
                self._ready[action.client] = action
        self._sync_timers(engine)

    def _aggregate(self, engine: EngineAPI, agg: Aggregate) -> None:
        """``w <- w + sum_i weight_i (x_i - w_{tau_i})`` as one engine commit (Alg. 1)."""
        applied: list[Update] = []
        weights: list[float] = []
        for c in agg.contributions:
            update: Update = c.payload
            if c.weight <= 0.0:
                engine.discard(update, "fedcompass staleness cut-off")
                continue
            update.staleness = c.staleness
            if update.record is not None:
                update.record.staleness = c.staleness
            applied.append(update)
            weights.append(c.weight)
        params = dict(engine.params)
        if applied:
            delta = weighted_delta([u.delta_terms() for u in applied], weights)
            params = add_scaled(engine.params, delta)
        version = engine.commit(
            params,
            applied,
            metrics={
                "group": -1 if agg.group is None else agg.group,
                "deadline": float(agg.trigger == "deadline"),
                "late-updates": sum(c.late for c in agg.contributions),
                "sum-weights": float(sum(weights)),
            },
        )
        if version != agg.version:
            raise RuntimeError(
                f"FedCompass out of sync: scheduler version {agg.version}, engine {version}"
            )

    def _sync_timers(self, engine: EngineAPI) -> None:
        """One engine timer per open group, at its deadline; cancel closed groups' timers."""
        open_groups = self._scheduler.open_deadlines()
        for gid, timer in list(self._timers.items()):
            if gid not in open_groups:
                engine.cancel_timer(timer)
                del self._timers[gid]
        for gid, deadline in open_groups.items():
            if gid not in self._timers:
                self._timers[gid] = engine.set_timer(deadline, gid)
