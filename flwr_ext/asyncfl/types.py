"""The objects the engine and the strategies share: nodes, jobs, updates, timers, the engine API.

Strategies see the engine only through :class:`EngineAPI`; everything else in
:mod:`flwr_ext.asyncfl` is the engine's own business.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flwr_ext.asyncfl.aggregate import Difference

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flwr_ext.asyncfl.records import UpdateRecord

Params = dict[str, np.ndarray]


@dataclass
class NodeState:
    """One SuperNode as the engine sees it.

    ``rank`` is the discovery order (stable across a resume), ``key`` the ``partition-id`` the
    node reported (``None`` until it does); :attr:`ident` is the key the clock, the records and
    the strategies use. ``failures`` counts consecutive failed jobs of this node only,
    ``expired`` its messages that expired (TTL) since its last valid reply (never charged as
    failures; they set the node's back-off).
    """

    node_id: int
    rank: int
    key: int | None = None
    jobs: int = 0
    failures: int = 0
    expired: int = 0
    busy: bool = False
    retired: bool = False

    @property
    def ident(self) -> int:
        """``partition-id`` once reported, else the discovery rank."""
        return self.key if self.key is not None else self.rank


@dataclass
class Job:
    """One train instruction in flight (``msg_id`` is ``None`` until it was pushed)."""

    node: NodeState
    job_index: int
    version: int
    msg_id: str | None
    extra: dict[str, Any]
    sent_steps: int | None
    t_dispatch: float
    wall_dispatch: float
    bytes_down: int
    lower_bound: float
    t_finish: float | None = None
    released: bool = False  # its model version was dropped (the reply is beyond max_staleness)
    shadow: Params | None = field(default=None, repr=False)  # downlink: w_i the node trains from


class BaseReleased(LookupError):
    """The model version an update was trained on is no longer kept (see ``versions``)."""


@dataclass(eq=False)
class Update:
    """A valid reply, decoded once: it carries either the client's delta or its full weights.

    A compressed reply (or one flagged as a delta) is decoded straight into the delta
    ``y_i - x_{v_i}``; a plain reply carries the client's full weights ``y_i``. Strategies ask
    for what their rule uses, :meth:`delta` or :attr:`params`; the other form is derived once,
    from the model version the update was trained on (``base``), only when asked for.
    """

    job: Job
    num_examples: float
    metrics: dict[str, Any]
    num_steps: int
    t_finish: float
    bytes_up: int
    staleness: int = 0
    record: UpdateRecord | None = None
    base: Params | None = field(default=None, repr=False)
    _delta: Params | None = field(default=None, repr=False)
    _params: Params | None = field(default=None, repr=False)

    @property
    def version(self) -> int:
        """The model version this update was trained on."""
        return self.job.version

    @property
    def node_key(self) -> int:
        """Stable node key (``partition-id`` or rank)."""
        return self.job.node.ident

    @property
    def duration(self) -> float:
        """Clock time from dispatch to finish."""
        return self.t_finish - self.job.t_dispatch

    @property
    def is_delta(self) -> bool:
        """Whether the reply itself was a delta (compressed, or flagged by the client)."""
        return self._params is None

    def _need_base(self, what: str) -> Params:
        if self.base is None:
            raise BaseReleased(
                f"{what} of the update of node {self.node_key} needs model version "
                f"{self.version}, which is no longer kept (beyond max_staleness)"
            )
        return self.base

    def delta(self) -> Params:
        """``y_i - x_{v_i}``: the change this client made to the model it was sent."""
        if self._delta is None:
            base = self._need_base("the delta")
            assert self._params is not None
            self._delta = {k: self._params[k] - base[k] for k in base}
        return self._delta

    def delta_terms(self) -> Params | Difference:
        """The delta for :func:`~flwr_ext.asyncfl.aggregate.weighted_delta`, not materialised.

        Equal to :meth:`delta`; a full-weight reply stays ``params - base`` until aggregated.
        """
        if self._delta is not None:
            return self._delta
        return Difference(self.params, self._need_base("the delta"))

    @property
    def params(self) -> Params:
        """``y_i``: the client's full weights (``base + delta`` for a delta reply)."""
        if self._params is None:
            base = self._need_base("the weights")
            assert self._delta is not None
            self._params = {k: base[k] + self._delta[k].astype(base[k].dtype) for k in base}
        return self._params


@dataclass(order=True)
class Timer:
    """A strategy timer on the engine's clock."""

    at: float
    seq: int
    payload: Any = field(compare=False, default=None)
    cancelled: bool = field(compare=False, default=False)


class EngineAPI(Protocol):
    """What a strategy's hooks may read and call (the engine implements it)."""

    @property
    def now(self) -> float:
        """Current clock time."""
        ...

    @property
    def version(self) -> int:
        """Current server model version."""
        ...

    @property
    def params(self) -> Params:
        """The current global model (do not modify in place)."""
        ...

    @property
    def nodes(self) -> Mapping[int, NodeState]:
        """Known nodes by Flower node id (retired ones included, flagged)."""
        ...

    @property
    def num_rounds(self) -> int:
        """Server model versions to reach."""
        ...

    def model_at(self, version: int) -> Params:
        """The arrays of ``version`` while a job or update still needs them."""
        ...

    def commit(
        self, params: Params, updates: list[Update], metrics: dict[str, float] | None = None
    ) -> int:
        """Make ``params`` the new global model from ``updates``; return the new version."""
        ...

    def discard(self, update: Update, reason: str) -> None:
        """Record ``update`` as not applied, with the strategy's reason."""
        ...

    def set_timer(self, at: float, payload: Any = None) -> Timer:
        """Call ``on_timer`` at clock time ``at``."""
        ...

    def cancel_timer(self, timer: Timer) -> None:
        """Cancel a timer that has not fired."""
        ...
