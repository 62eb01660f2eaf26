"""Device profiles: how long a job takes on a simulated device.

A job = download the model, run ``steps`` local steps, upload the reply. Its virtual duration is

    latency + 8 * bytes_down / down_bps + steps * step_time(node) * jitter(node, job)
    + latency + 8 * bytes_up / up_bps

``step_time(node)`` is drawn once per node from the profile's distribution, ``jitter(node, job)``
once per job (uniform in ``[1 - j, 1 + j]``). Every random draw comes from its own generator
seeded with ``(seed, node key, job index)``, never from a shared stream consumed in arrival
order, so a seeded run gives the same durations however many replies Ray returns at once.

Distributions of the per-step time (mean ``m``): ``homogeneous`` (all ``m``), ``normal``
(``N(m, std)``), ``exponential`` (``Exp(m)``), ``lognormal`` (median-free parametrisation with mean
``m`` and log-std ``std``), ``trace`` (a CSV with columns ``node, step_time`` and optionally
``up_mbps, down_mbps, latency``; node ``k`` uses row ``k mod rows``), ``intertwined`` (nodes
``0 .. slow_nodes - 1`` take ``slow_factor * m``, the others ``m``: with the ``intertwined``
partitioner of :mod:`flwr_ext.data.partition` the slow nodes hold the labels the fast ones
lack, so device speed and data are correlated). Draws are floored at
``min_step_time`` (default ``m / 100``) so no device is infinitely fast. The FedCompass paper
(Li et al., ICLR 2024, Sec. 5) uses the same normal / exponential families for client speeds.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

KINDS = ("homogeneous", "normal", "exponential", "lognormal", "trace", "intertwined")


@dataclass(frozen=True)
class NodeSpeed:
    """The fixed characteristics of one device."""

    step_time: float
    up_bps: float
    down_bps: float
    latency: float


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator that depends only on ``key`` (integers >= 0)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


@dataclass(frozen=True)
class DeviceProfile:
    """Per-node speed and link parameters of a simulated fleet.

    Parameters
    ----------
    kind : str
        One of ``homogeneous``, ``normal``, ``exponential``, ``lognormal``, ``trace``.
    mean_step_time : float
        Mean seconds per local step.
    std : float
        Standard deviation (normal, seconds) or log-std (lognormal).
    min_step_time : float or None
        Floor of the per-step time (default ``mean_step_time / 100``).
    jitter : float
        Per-job multiplicative noise, uniform in ``[1 - jitter, 1 + jitter]``.
    up_mbps, down_mbps : float
        Link bandwidth in Mbit/s (uplink = client to server).
    latency : float
        One-way latency in seconds.
    trace : str or None
        CSV file for ``kind="trace"``.
    default_steps : int
        Steps assumed for a job whose reply has no ``num-steps`` and whose config had no
        ``local-steps``.
    min_steps : int
        Lower bound on the steps of a job sent without ``local-steps`` (used for event ordering).
    slow_nodes : int
        ``intertwined``: node keys ``0 .. slow_nodes - 1`` are slow (>= 0).
    slow_factor : float
        ``intertwined``: their step time is ``slow_factor * mean_step_time`` (> 0).
    """

    kind: str = "homogeneous"
    mean_step_time: float = 0.1
    std: float = 0.05
    min_step_time: float | None = None
    jitter: float = 0.0
    up_mbps: float = 20.0
    down_mbps: float = 50.0
    latency: float = 0.05
    trace: str | None = None
    default_steps: int = 10
    min_steps: int = 1
    slow_nodes: int = 2
    slow_factor: float = 10.0
    _rows: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown profile kind {self.kind!r}; one of {KINDS}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")
        if self.mean_step_time <= 0:
            raise ValueError("mean_step_time must be > 0")
        if self.slow_nodes < 0:
            raise ValueError(f"slow_nodes must be >= 0, got {self.slow_nodes!r}")
        if not (math.isfinite(self.slow_factor) and self.slow_factor > 0):
            raise ValueError(f"slow_factor must be > 0, got {self.slow_factor!r}")
        if self.kind == "trace":
            if not self.trace:
                raise ValueError("kind='trace' needs a trace file")
            object.__setattr__(self, "_rows", tuple(_read_trace(self.trace)))

    @property
    def floor(self) -> float:
        """The smallest per-step time any node can draw."""
        if self.min_step_time is not None:
            return self.min_step_time
        return self.mean_step_time / 100.0

    def node(self, seed: int, key: int) -> NodeSpeed:
        """The characteristics of node ``key`` (deterministic in ``(seed, key)``)."""
        return _node_speed(self, int(seed), int(key))

    def jitter_factor(self, seed: int, key: int, job_index: int) -> float:
        """Multiplicative noise of job ``job_index`` on node ``key``."""
        if self.jitter == 0.0:
            return 1.0
        u = keyed_rng(seed, key, job_index, 2).uniform(-1.0, 1.0)
        return 1.0 + self.jitter * float(u)

    def fastest_step_time(self, seed: int, keys: range | list[int]) -> float:
        """Lower bound of the per-step time over ``keys`` (for nodes not identified yet)."""
        return min((self.node(seed, k).step_time for k in keys), default=self.floor)


def _read_trace(path: str) -> list[dict[str, float]]:
    with Path(path).open(newline="") as fh:
        rows = [{k.strip(): float(v) for k, v in r.items() if k} for r in csv.DictReader(fh)]
    if not rows or "step_time" not in rows[0]:
        raise ValueError(f"trace {path} needs a 'step_time' column and at least one row")
    return rows


@lru_cache(maxsize=65536)
def _node_speed(p: DeviceProfile, seed: int, key: int) -> NodeSpeed:
    rng = keyed_rng(seed, key, 0, 1)
    m, up, down, lat = p.mean_step_time, p.up_mbps, p.down_mbps, p.latency
    if p.kind == "homogeneous":
        t = m
    elif p.kind == "normal":
        t = rng.normal(m, p.std)
    elif p.kind == "exponential":
        t = rng.exponential(m)
    elif p.kind == "lognormal":
        # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2) = m
        t = rng.lognormal(math.log(m) - p.std**2 / 2.0, p.std)
    elif p.kind == "intertwined":
        t = m * p.slow_factor if key < p.slow_nodes else m
    else:
        row = p._rows[key % len(p._rows)]
        t = row["step_time"]
        up, down, lat = row.get("up_mbps", up), row.get("down_mbps", down), row.get("latency", lat)
    return NodeSpeed(max(float(t), p.floor), up * 1e6, down * 1e6, lat)
