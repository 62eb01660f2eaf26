"""Clocks of the asynchronous engine: wall time for deployments, virtual time for simulation.

The engine asks its clock two things about every job: when did it finish (:meth:`finish_time`,
once the reply is in) and how early could it possibly finish (:meth:`lower_bound`, at dispatch).
With :class:`VirtualClock` the engine processes a finished job only when no unfinished job has a
lower bound before it, so events happen in virtual-time order whatever order Ray returns replies
in (see DESIGN.md, "Clocks"). With :class:`RealClock` a job finishes when its reply arrives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr_ext.asyncfl.profiles import DeviceProfile

#: Up to this many candidate nodes the lower bound of an unidentified node's job is the exact
#: fastest of them; beyond, the profile's floor (drawing every node would cost O(nodes)).
EXACT_BOUND_KEYS = 1000


@dataclass
class JobTiming:
    """Virtual durations of one job (seconds)."""

    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        """Download + compute + upload."""
        return self.download + self.compute + self.upload


class RealClock:
    """Wall-clock time in seconds since the engine started (for deployments)."""

    is_virtual = False

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def reset(self) -> None:
        """Restart at zero."""
        self._t0 = time.monotonic()

    @property
    def now(self) -> float:
        """Seconds since :meth:`reset`."""
        return time.monotonic() - self._t0

    def advance(self, t: float) -> None:
        """Wall time advances by itself."""

    def resume_at(self, t: float) -> None:
        """Continue a resumed run: :attr:`now` is ``t`` at this instant."""
        self._t0 = time.monotonic() - float(t)


class VirtualClock:
    """Simulated time driven by a :class:`DeviceProfile`.

    Parameters
    ----------
    profile : DeviceProfile
        Per-node speed and link parameters.
    seed : int
        Seed of every draw (keyed by ``(seed, node key, job index)``).
    """

    is_virtual = True

    def __init__(self, profile: DeviceProfile | None = None, seed: int = 0) -> None:
        self.profile = profile or DeviceProfile()
        self.seed = int(seed)
        self._now = 0.0

    def reset(self) -> None:
        """Restart at zero."""
        self._now = 0.0

    @property
    def now(self) -> float:
        """Current virtual time."""
        return self._now

    def advance(self, t: float) -> None:
        """Move to time ``t`` (never backwards)."""
        self._now = max(self._now, float(t))

    def resume_at(self, t: float) -> None:
        """Continue a resumed run at virtual time ``t``."""
        self._now = float(t)

    def timing(
        self, key: int, job_index: int, bytes_down: int, bytes_up: int, steps: int
    ) -> JobTiming:
        """Durations of job ``job_index`` of node ``key`` for the real message sizes."""
        node = self.profile.node(self.seed, key)
        jit = self.profile.jitter_factor(self.seed, key, job_index)
        return JobTiming(
            download=node.latency + 8.0 * bytes_down / node.down_bps,
            compute=steps * node.step_time * jit,
            upload=node.latency + 8.0 * bytes_up / node.up_bps,
        )

    def lower_bound(
        self,
        key: int | None,
        job_index: int,
        bytes_down: int,
        steps: int,
        candidates: int | range | list[int],
    ) -> float:
        """Shortest possible duration of a job (upload of 0 bytes).

        ``key=None`` (node not identified yet): the fastest of the candidate keys (``range(n)``
        for an int ``n``) with the smallest jitter; computed once per candidate set, so a run
        with 10,000 unidentified nodes does not scan them at every dispatch.
        """
        if key is not None:
            t = self.timing(key, job_index, bytes_down, 0, steps)
            return t.total
        lat, down, step = self._fastest(
            range(candidates) if isinstance(candidates, int) else candidates
        )
        return 2 * lat + 8.0 * bytes_down / down + steps * step

    def _fastest(self, keys: range | list[int]) -> tuple[float, float, float]:
        memo_key = keys if isinstance(keys, range) else tuple(keys)
        cache = self.__dict__.setdefault("_fastest_cache", {})
        if memo_key not in cache and len(keys) > EXACT_BOUND_KEYS:
            # a looser bound valid for every node (ordering stays exact; only how long the
            # engine waits for replies changes), instead of drawing thousands of node speeds
            p = self.profile
            rows = getattr(p, "_rows", ()) if p.kind == "trace" else ()
            lat = min([p.latency, *(r.get("latency", p.latency) for r in rows)])
            down = max([p.down_mbps, *(r.get("down_mbps", p.down_mbps) for r in rows)]) * 1e6
            cache[memo_key] = (lat, down, p.floor * (1.0 - p.jitter))
        if memo_key not in cache:
            p = self.profile
            lat = min((p.node(self.seed, k).latency for k in keys), default=0.0)
            down = max((p.node(self.seed, k).down_bps for k in keys), default=1e12)
            step = p.fastest_step_time(self.seed, keys) * (1.0 - p.jitter)
            cache[memo_key] = (lat, down, step)
        return cache[memo_key]
