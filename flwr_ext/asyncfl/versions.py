"""The version store: server model versions, kept exactly as long as something needs them.

A version is needed while it is the current model, while a job that was sent it is in flight
(unless its reply can no longer be applied: older than ``max_staleness``, or a delta that a
strategy never rebuilds into weights), and while an update trained on it is held by a strategy
(a buffer) that may still ask for its weights or its delta. References are counted, so releasing
is O(1) and no per-event scan of the jobs is needed. ``peak_bytes`` reports the most the store
ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord

from flwr_ext.arrays import numpy_to_record, record_to_numpy
from flwr_ext.asyncfl.types import Params


@dataclass
class Version:
    """One model version: its arrays, the ArrayRecord sent to clients, its wire size."""

    params: Params
    arrays: ArrayRecord
    nbytes: int
    refs: int = 0


class VersionStore:
    """Model versions by number, with reference counts (see the module docstring)."""

    def __init__(self) -> None:
        self._versions: dict[int, Version] = {}
        self.current: int | None = None
        self._bytes = 0
        self.peak_bytes = 0

    def __contains__(self, version: int) -> bool:
        return version in self._versions

    def __getitem__(self, version: int) -> Version:
        return self._versions[version]

    @property
    def kept(self) -> list[int]:
        """Version numbers held now."""
        return sorted(self._versions)

    @property
    def nbytes(self) -> int:
        """Bytes of the versions held now (model arrays, counted once)."""
        return self._bytes

    def put(
        self,
        version: int,
        params: Params,
        arrays: ArrayRecord | None = None,
        nbytes: int = 0,
        *,
        current: bool = True,
    ) -> Version:
        """Store ``version``; make it the current one (the previous one may be released)."""
        if arrays is None:  # serialise once; the arrays become read-only views on those bytes
            arrays = numpy_to_record(params)
            params = record_to_numpy(arrays)
        v = Version(params, arrays, int(nbytes or arrays.count_bytes()))
        old = self._versions.get(version)
        if old is not None:
            v.refs = old.refs
            self._bytes -= old.nbytes
        self._versions[version] = v
        self._bytes += v.nbytes
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        if current:
            previous, self.current = self.current, version
            if previous is not None and previous != version:
                self._maybe_release(previous)
        return v

    def collect(self) -> None:
        """Drop every version nothing refers to (after a resume)."""
        for version in [v for v, ver in self._versions.items() if ver.refs <= 0]:
            self._maybe_release(version)

    def acquire(self, version: int) -> None:
        """Something (a job, a held update) needs ``version``."""
        self._versions[version].refs += 1

    def release(self, version: int) -> None:
        """One user of ``version`` no longer needs it."""
        v = self._versions.get(version)
        if v is None:
            return
        v.refs -= 1
        self._maybe_release(version)

    def _maybe_release(self, version: int) -> None:
        v = self._versions.get(version)
        if v is not None and v.refs <= 0 and version != self.current:
            del self._versions[version]
            self._bytes -= v.nbytes
