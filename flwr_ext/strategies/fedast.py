"""FedAST: several models trained at once over the same clients, buffered and asynchronous.

Askin, Sharma, Joe-Wong, Joshi, "FedAST: Federated Asynchronous Simultaneous Training",
UAI 2024 (arXiv:2406.00302); reference code ``askinb/FedAST`` (``server.py``).

The engine holds one model, so the ``M`` task models live in it side by side under the key
prefixes ``task{m}/`` (:func:`stack_tasks`, :func:`split_tasks`). A job trains one task: its
config carries ``task-id`` and ``task-version``, the ClientApp trains only that task's arrays
(:func:`task_arrays`) and replies with every array, the others unchanged
(:func:`merge_task`); the strategy reads only the task's keys of the reply. Versions and
staleness are counted per task; every task aggregation is one engine commit.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.common.logger import log

from flwr_ext.asyncfl.aggregate import Difference, add_scaled, weighted_delta
from flwr_ext.asyncfl.profiles import keyed_rng
from flwr_ext.asyncfl.strategy import AsyncStrategy
from flwr_ext.asyncfl.types import EngineAPI, Job, NodeState, Params, Update
from flwr_ext.staleness import Staleness, constant

#: Job-config keys: the task a job trains and the task's model version it was sent.
TASK_ID = "task-id"
TASK_VERSION = "task-version"

#: Run-config keys read by :meth:`FedAST.from_run_config` and their defaults.
RUN_CONFIG_KEYS: dict[str, Any] = {
    "fedast-tasks": 2,
    "fedast-active": 4,
    "fedast-buffer-size": 2,
    "fedast-dynamic": True,
    "fedast-window": 8,
    "fedast-realloc-every": 0,
    "fedast-task-rounds": 0,
    "server-lr": 1.0,
    "seed": 0,
}


# ---------------------------------------------------------------------- the M models in one
def task_prefix(task: int) -> str:
    """``task{m}/``: the key prefix of task ``m``'s arrays in the engine's model."""
    return f"task{int(task)}/"


def stack_tasks(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One model holding ``models[m]`` under ``task{m}/`` (arrays of any kind, not copied)."""
    return {task_prefix(m) + k: v for m, model in enumerate(models) for k, v in model.items()}


def split_tasks(params: Mapping[str, Any], num_tasks: int) -> list[dict[str, Any]]:
    """Inverse of :func:`stack_tasks`: task ``m``'s arrays with their own names."""
    return [task_arrays(params, m) for m in range(int(num_tasks))]


def task_arrays(params: Mapping[str, Any], task: int) -> dict[str, Any]:
    """Task ``task``'s arrays of a stacked model, without the prefix."""
    pre = task_prefix(task)
    return {k[len(pre) :]: v for k, v in params.items() if k.startswith(pre)}


def merge_task(sent: ArrayRecord, task: int, trained: Mapping[str, Any]) -> ArrayRecord:
    """The reply of a job of ``task``: ``sent`` with that task's arrays replaced by ``trained``.

    The engine checks that a reply has every key it sent; the other tasks' arrays go back
    unchanged (their delta is zero and the strategy does not read them).
    """
    pre = task_prefix(task)
    out = ArrayRecord()
    for k, v in sent.items():
        out[k] = v
    for k, v in ArrayRecord(dict(trained)).items():
        if pre + k not in sent:
            raise KeyError(f"task {task} has no array {k!r}")
        out[pre + k] = v
    return out


# ---------------------------------------------------------------------- pure pieces
def variance_proxy(
    deltas: Sequence[Mapping[str, np.ndarray]], scale: float = 1.0, skip: Sequence[str] = ("bias",)
) -> float:
    """Relative spread of a task's recent updates (``calculateUpdVariance`` of the reference).

    With ``n`` deltas, ``dbar`` their mean and the tensors whose name contains none of
    ``skip``::

        V = sqrt(scale * sum_k ||delta_k - dbar||^2 / (n * ||dbar||^2))

    ``scale`` is the reference's per-task constant ``eta_l eta_g / (eta_l Q)^2``. The reference
    returns ``float(x)**1/2``, which Python reads as ``x / 2`` (``**`` binds tighter than
    ``/``); the square root is what it means and what is computed here. 0 when ``dbar = 0``.
    """
    n = len(deltas)
    if n == 0:
        return 0.0
    spread, norm = 0.0, 0.0
    for key in deltas[0]:
        if any(s in key for s in skip):
            continue
        stack = np.stack([np.asarray(d[key], dtype=np.float64) for d in deltas])
        mean = stack.mean(axis=0)
        spread += float(((stack - mean) ** 2).sum())
        norm += float((mean**2).sum())
    if norm == 0.0:
        return 0.0
    return math.sqrt(float(scale) * spread / (n * norm))


def reallocate(
    variances: Sequence[float], total: int, ratio: int, active: Sequence[bool]
) -> list[int]:
    """Active jobs per task, in units of ``ratio``, in proportion to ``variances``.

    ``redistributeActiveWorks`` of the reference: every active task first gets ``ratio``
    jobs; the rest of ``total`` goes ``ratio`` at a time to the task whose proportional share
    ``int(total * V_m / sum V) - ratio`` minus what it got is largest (first on ties).
    Finished tasks (``active[m]`` false) get 0. The variances unchanged when all are 0.
    """
    m = len(variances)
    v = [float(x) if active[i] else 0.0 for i, x in enumerate(variances)]
    out = [ratio if active[i] else 0 for i in range(m)]
    if sum(v) <= 0.0:
        return out
    share = [int(total * x / sum(v)) - ratio if active[i] else -math.inf for i, x in enumerate(v)]
    left = total - sum(out)
    while left > 0:
        i = share.index(max(share))
        out[i] += ratio
        share[i] -= ratio
        left -= ratio
    return out


class FedAST(AsyncStrategy):
    """FedAST (Askin et al., UAI 2024): ``M`` models, one buffer each, jobs reallocated.

    Task ``m`` keeps ``R_m`` jobs in flight (``sum_m R_m = R`` of the idle nodes a dispatch
    is offered, so ``R`` should not exceed the number of nodes). Each reply of task ``m``
    goes to its buffer; when the buffer holds ``b_m`` updates (Sec. 3, "buffered
    asynchronous aggregation")::

        x_m <- x_m + eta_m / |B_m| * sum_{k in B_m} s(tau_k) * (y_k - x_{m, v_k})

    with ``tau_k`` the task's own staleness (its versions since the job was sent) and ``s``
    constant in the paper. An idle node gets a job of the task furthest below its ``R_m``;
    when more nodes are idle than jobs are missing, the nodes are drawn uniformly (the
    reference samples clients uniformly).

    Dynamic allocation (``dynamic=True``, the paper's Realloc): after each update of task
    ``m`` with ``window`` updates in its window, the variance proxy ``V_m``
    (:func:`variance_proxy`) of the last ``window`` deltas is recorded; every
    ``realloc_every`` updates (default the reference's ``(3 R // 4) * active tasks``), once
    every task has more than ``window`` versions, the mean ``V_m`` since the last
    reallocation sets ``R_m`` (:func:`reallocate`) and ``b_m = max(1, ceil(R_m / ratio))``
    keeps ``R_m / b_m`` at ``ratio``. A task that reached ``task_rounds`` versions stops; its
    jobs go to the others in proportion to their ``R_m``, and its late replies are discarded.

    Parameters
    ----------
    num_tasks : int
        ``M``.
    active : int or sequence of int
        Initial ``R_m`` (one value for every task, or one per task).
    buffer_size : int or sequence of int
        Initial ``b_m`` (fixed when ``dynamic`` is false).
    server_lr : float or sequence of float
        ``eta_m``.
    dynamic : bool
        Reallocate jobs by the variance proxy (the paper's FedAST); ``False``: static.
    ratio : int or None
        ``R_m / b_m`` kept by the reallocation (reference ``R_bs_ratio``); default
        ``max(1, R_0 // b_0)`` of the first task.
    window : int
        Updates in each task's variance window (reference: 8).
    realloc_every : int or None
        Updates between reallocations; ``None``: ``(3 R // 4) * active tasks``.
    variance_scale : float or sequence of float
        Per-task constant of :func:`variance_proxy` (1.0: tasks with equal learning rates and
        steps; the reference uses ``eta_g / (eta_l Q^2)``).
    task_rounds : int or sequence of int or None
        Versions after which a task stops (``None`` or 0: never; the run then ends at the
        engine's ``num_rounds``, which counts every task's commits).
    task_config : sequence of mapping, optional
        Extra job config per task (e.g. ``{"lr": 0.1}``), merged under ``task-id``.
    staleness : Staleness
        ``s(tau)`` on the task's staleness; default constant (the paper). A weight of 0
        discards the update.
    seed : int
        Seeds the node draws (``SeedSequence([seed, dispatch index])``).

    Notes
    -----
    Cost with today's engine: every job ships all ``M`` models down and up (the engine
    sends one model per run and checks that a reply has its keys), i.e. ``M`` times the
    bytes of a single-task job; an engine hook for per-job arrays would remove the factor.
    """

    def __init__(
        self,
        num_tasks: int = 2,
        active: int | Sequence[int] = 4,
        buffer_size: int | Sequence[int] = 2,
        server_lr: float | Sequence[float] = 1.0,
        dynamic: bool = True,
        ratio: int | None = None,
        window: int = 8,
        realloc_every: int | None = None,
        variance_scale: float | Sequence[float] = 1.0,
        task_rounds: int | Sequence[int] | None = None,
        task_config: Sequence[Mapping[str, Any]] | None = None,
        staleness: Staleness | None = None,
        seed: int = 0,
        weighted_by_key: str | None = None,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        super().__init__(weighted_by_key, arrayrecord_key, configrecord_key)
        if num_tasks < 1:
            raise ValueError("num_tasks must be >= 1")
        self.num_tasks = int(num_tasks)
        self.active = self._per_task(active, "active", int)
        self.buffer_size = self._per_task(buffer_size, "buffer_size", int)
        self.server_lr = self._per_task(server_lr, "server_lr", float)
        self.variance_scale = self._per_task(variance_scale, "variance_scale", float)
        rounds = task_rounds if task_rounds is not None else 0
        self.task_rounds = self._per_task(rounds, "task_rounds", int)
        if any(r < 1 for r in self.active) or any(b < 1 for b in self.buffer_size):
            raise ValueError("active and buffer_size must be >= 1 for every task")
        if any(lr <= 0 for lr in self.server_lr) or any(r < 0 for r in self.task_rounds):
            raise ValueError("server_lr must be > 0 and task_rounds >= 0")
        self.dynamic = bool(dynamic)
        self.ratio = int(ratio) if ratio else max(1, self.active[0] // self.buffer_size[0])
        if self.ratio < 1 or window < 2:
            raise ValueError("ratio must be >= 1 and window >= 2")
        self.window = int(window)
        if realloc_every is not None and realloc_every < 1:
            raise ValueError("realloc_every must be >= 1 (or None)")
        self.realloc_every = realloc_every
        configs = list(task_config) if task_config is not None else [{}] * self.num_tasks
        if len(configs) != self.num_tasks:
            raise ValueError(f"task_config needs {self.num_tasks} entries")
        self.task_config = [dict(c) for c in configs]
        self.staleness_fn = staleness if staleness is not None else constant()
        self.seed = int(seed)
        self._reset()

    def _per_task(self, value: Any, name: str, kind: type) -> list:
        if isinstance(value, int | float):
            return [kind(value)] * self.num_tasks
        out = [kind(v) for v in value]
        if len(out) != self.num_tasks:
            raise ValueError(f"{name} needs 1 or {self.num_tasks} values, got {len(out)}")
        return out

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> FedAST:
        """Build from a Flower run config (keys and defaults: :data:`RUN_CONFIG_KEYS`).

        ``fedast-tasks`` (``M``), ``fedast-active`` (initial ``R_m``), ``fedast-buffer-size``
        (initial ``b_m``), ``fedast-dynamic``, ``fedast-window``, ``fedast-realloc-every``
        (0: the reference's period), ``fedast-task-rounds`` (0: no per-task limit),
        ``server-lr`` and ``seed``.
        """

        def get(key: str) -> Any:
            default = RUN_CONFIG_KEYS[key]
            return type(default)(cfg.get(key, default))

        return cls(
            num_tasks=get("fedast-tasks"),
            active=get("fedast-active"),
            buffer_size=get("fedast-buffer-size"),
            server_lr=get("server-lr"),
            dynamic=get("fedast-dynamic"),
            window=get("fedast-window"),
            realloc_every=get("fedast-realloc-every") or None,
            task_rounds=get("fedast-task-rounds"),
            seed=get("seed"),
        )

    @property
    def max_staleness(self) -> None:
        """No engine-side cut-off: the engine counts every task's commits, not the task's."""
        return None

    @property
    def allocation(self) -> list[int]:
        """Current ``R_m``."""
        return list(self._alloc)

    @property
    def task_versions(self) -> list[int]:
        """Versions of each task so far."""
        return list(self._version)

    def summary(self) -> None:
        """Log the configuration."""
        log(INFO, "\t├──> tasks: %d, R: %s, b: %s", self.num_tasks, self.active, self.buffer_size)
        log(INFO, "\t└──> dynamic: %s (ratio %d, window %d)", self.dynamic, self.ratio, self.window)

    def _reset(self) -> None:
        m = self.num_tasks
        self._alloc = list(self.active)
        self._bsize = list(self.buffer_size)
        self._version = [0] * m
        self._inflight = [0] * m
        self._buffers: list[list[tuple[Update, float]]] = [[] for _ in range(m)]
        self._windows: list[deque] = [deque(maxlen=self.window) for _ in range(m)]
        self._variances: list[list[float]] = [[] for _ in range(m)]
        self._since_realloc = 0
        self._done = [False] * m
        self._sent: dict[int, int] = {}  # node rank -> task of the job handed to the engine
        self._dispatches = 0
        self._history: list[tuple[float, list[int]]] = []

    # ------------------------------------------------------------------ hooks, in run order
    def on_start(self, engine: EngineAPI) -> None:
        """Check that the engine's model holds every task; fresh per-task state."""
        for m in range(self.num_tasks):
            if not task_arrays(engine.params, m):
                raise ValueError(
                    f"FedAST: the model has no arrays under {task_prefix(m)!r}; build the "
                    "initial arrays with flwr_ext.strategies.fedast.stack_tasks"
                )
        self._reset()
        self._history.append((engine.now, list(self._alloc)))

    def configure_dispatch(
        self, engine: EngineAPI, idle: list[NodeState]
    ) -> list[tuple[NodeState, dict[str, Any]]]:
        """Give idle nodes jobs of the tasks below their ``R_m`` (the furthest below first)."""
        for node in idle:  # handed over last time but idle without a reply: the push failed
            task = self._sent.pop(node.rank, None)
            if task is not None:
                self._inflight[task] -= 1
        missing = sum(max(0, r - f) for r, f in zip(self._alloc, self._inflight, strict=True))
        if not missing or not idle:
            return []
        nodes = idle
        if len(idle) > missing:
            rng = keyed_rng(self.seed, self._dispatches)
            nodes = [idle[i] for i in sorted(rng.choice(len(idle), missing, replace=False))]
        self._dispatches += 1
        out = []
        for node in nodes:
            gaps = [r - f for r, f in zip(self._alloc, self._inflight, strict=True)]
            task = gaps.index(max(gaps))
            if gaps[task] <= 0:
                break
            self._inflight[task] += 1
            self._sent[node.rank] = task
            extra = {**self.task_config[task], TASK_ID: task, TASK_VERSION: self._version[task]}
            out.append((node, extra))
        return out

    def on_update(self, engine: EngineAPI, update: Update) -> None:
        """Buffer the update in its task's buffer; aggregate the task at ``b_m``."""
        task = self._job_ended(update.job)
        if self._done[task]:
            engine.discard(update, "fedast task finished", f"task {task}")
            return
        stale = self._version[task] - int(update.job.extra[TASK_VERSION])
        update.staleness = stale
        if update.record is not None:
            update.record.staleness = stale
        weight = self.staleness_fn(stale)
        if weight <= 0.0:
            engine.discard(update, "too stale", f"task {task}: {stale}")
            return
        delta = self._task_delta(update, task)
        if self.dynamic:
            self._observe(task, delta)
        self._buffers[task].append((update, weight))
        if len(self._buffers[task]) >= self._bsize[task]:
            self._aggregate(engine, task)
        if self.dynamic:
            self._maybe_reallocate(engine)

    def on_job_failed(self, engine: EngineAPI, job: Job, reason: str) -> None:
        """The job's slot is free again (the next dispatch refills it)."""
        self._job_ended(job)

    def on_finish(self, engine: EngineAPI) -> None:
        """Partial buffers are never applied: say so."""
        for task, buffer in enumerate(self._buffers):
            for update, _ in buffer:
                engine.discard(
                    update, "fedast run ended before the buffer was full", f"task {task}"
                )
        self._buffers = [[] for _ in range(self.num_tasks)]

    # ------------------------------------------------------------------ internals
    def _job_ended(self, job: Job) -> int:
        task = int(job.extra[TASK_ID])
        if self._sent.pop(job.node.rank, None) is not None:
            self._inflight[task] -= 1
        return task

    def _task_delta(self, update: Update, task: int) -> Params | Difference:
        """The update's delta on the task's keys only (not materialised for full weights)."""
        terms = update.delta_terms()
        keys = [k for k in terms if k.startswith(task_prefix(task))]
        if isinstance(terms, Difference):
            return Difference(terms.a, {k: terms.b[k] for k in keys})
        return {k: terms[k] for k in keys}

    def _observe(self, task: int, delta: Params | Difference) -> None:
        """Window of the task's last deltas; its variance proxy once the window is full."""
        win = self._windows[task]
        win.append({k: np.array(delta[k]) for k in delta})
        self._since_realloc += 1
        if len(win) == self.window:
            self._variances[task].append(variance_proxy(list(win), self.variance_scale[task]))

    def _maybe_reallocate(self, engine: EngineAPI) -> None:
        live = [not d for d in self._done]
        period = self.realloc_every or (3 * sum(self._alloc) // 4) * sum(live)
        if self._since_realloc < max(period, 1):
            return
        ready = all(
            self._version[m] > self.window and self._variances[m]
            for m in range(self.num_tasks)
            if live[m]
        )
        if not ready:
            return
        means = [float(np.mean(v)) if v and live[m] else 0.0 for m, v in enumerate(self._variances)]
        self._set_allocation(engine, reallocate(means, sum(self._alloc), self.ratio, live))
        self._variances = [[] for _ in range(self.num_tasks)]
        self._since_realloc = 0

    def _set_allocation(self, engine: EngineAPI, alloc: list[int]) -> None:
        self._alloc = alloc
        if self.dynamic:
            self._bsize = [max(1, math.ceil(r / self.ratio)) for r in alloc]
        self._history.append((engine.now, list(alloc)))

    def _aggregate(self, engine: EngineAPI, task: int) -> None:
        """``x_m <- x_m + eta_m / |B_m| * sum_k s_k delta_k``: one engine commit."""
        buffer, self._buffers[task] = self._buffers[task], []
        updates = [u for u, _ in buffer]
        deltas = [self._task_delta(u, task) for u in updates]
        step = weighted_delta(deltas, [w / len(buffer) for _, w in buffer])
        current = {k: engine.params[k] for k in step}
        params = {**engine.params, **add_scaled(current, step, self.server_lr[task])}
        self._version[task] += 1
        engine.commit(
            params,
            updates,
            metrics={
                "task-id": task,
                "task-version": self._version[task],
                "buffer-size": self._bsize[task],
                **{f"active-{m}": r for m, r in enumerate(self._alloc)},
            },
        )
        if self.task_rounds[task] and self._version[task] >= self.task_rounds[task]:
            self._finish_task(engine, task)

    def _finish_task(self, engine: EngineAPI, task: int) -> None:
        """Task done: its ``R_m`` goes to the others in proportion to theirs (reference)."""
        self._done[task] = True
        freed, alloc = self._alloc[task], list(self._alloc)
        alloc[task] = 0
        others = [m for m in range(self.num_tasks) if not self._done[m]]
        total = sum(alloc[m] for m in others)
        if others and total:
            add = {m: freed * alloc[m] // total for m in others}
            for m in sorted(others, key=lambda m: -alloc[m])[: freed - sum(add.values())]:
                add[m] += 1
            for m in others:
                alloc[m] += add[m]
        self._set_allocation(engine, alloc)
