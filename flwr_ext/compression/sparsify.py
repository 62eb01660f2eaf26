"""Sparsification stage: choose which coordinates of an update are sent.

* :func:`topk_indices` - the ``k`` largest magnitudes of one tensor (FedZip's per-layer top-z,
  Malekijoo et al. 2021, Sec. 3.1; DGC's top-k, Lin et al. ICLR 2018, Sec. 3).
* :func:`global_topk_indices` - one magnitude threshold shared by all tensors of the update.
* :func:`randomk_indices` - ``k`` positions drawn from a seed that both ends share; the mask is
  independent of the data. Without error feedback ``compress`` scales the kept values by
  ``numel / k`` so the decoded tensor is an unbiased estimate of the input
  (:func:`flwr_ext.compression.feedback.randomk_unbiased`); with error feedback they are sent
  unscaled (biased, the residual carries the rest).
* :func:`dgc_warmup_density` - DGC's exponential warm-up of the sparsity (Lin et al. 2018,
  Sec. 3.3: 75%, 93.75%, 98.4375%, 99.6%, 99.9%).

Selection is exact (precisely the ``k`` largest, ties broken by position) and fast: the
threshold is first estimated on a random sample (the trick of DGC Sec. 5), the candidates above
a slightly lower threshold are collected with one vectorised comparison, and the exact k-th
magnitude is found among those candidates only; a full ``np.partition`` is the fallback.
Exact zeros are never selected (sending them would carry no information).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

_SAMPLE = 20_000


def k_for(numel: int, density: float) -> int:
    """Number of coordinates kept in a tensor of ``numel`` elements at ``density``."""
    if numel == 0:
        return 0
    return min(numel, max(1, math.ceil(density * numel)))


def _candidates(mag: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Positions that surely contain the top-k of ``mag`` (all positions when unsure).

    The threshold is estimated on a random sample at a rank a bit below the target, so that
    the candidates cover the top-k with high probability; if they do not, all positions are
    returned and the caller's exact selection still holds.
    """
    n = mag.size
    if n > 4 * _SAMPLE and k < n // 8:
        sample = mag[rng.integers(0, n, _SAMPLE)]
        rank = min(_SAMPLE - 1, int(_SAMPLE * k / n * 1.5) + 20)
        lo = np.partition(sample, _SAMPLE - 1 - rank)[_SAMPLE - 1 - rank]
        cand = np.flatnonzero(mag >= lo)
        if cand.size >= k:
            return cand
    return np.arange(n)


def _kth_largest(mag: np.ndarray, k: int, rng: np.random.Generator) -> float:
    """Exact k-th largest value of a flat non-negative array (``1 <= k <= mag.size``)."""
    vals = mag[_candidates(mag, k, rng)]
    return float(np.partition(vals, vals.size - k)[vals.size - k])


def _select(mag: np.ndarray, pos: np.ndarray, thr: float, k: int) -> np.ndarray:
    """Positions (among ``pos``) with ``mag > thr`` plus the first ties, ``k`` in total."""
    vals = mag[pos]
    above = pos[vals > thr]
    need = k - above.size
    if need > 0 and thr > 0:
        ties = pos[vals == thr][:need]
        above = np.sort(np.concatenate([above, ties]))
    return above.astype(np.int64)


def topk_indices(x: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Sorted flat positions of the ``k`` largest ``|x|`` (exact zeros excluded).

    Parameters
    ----------
    x : np.ndarray
        A tensor of any shape (read flat).
    k : int
        Number of coordinates to keep.
    seed : int
        Seed of the sampling used to estimate the threshold (the result does not depend on it).
    """
    mag = np.abs(x.reshape(-1))
    if k <= 0 or mag.size == 0:
        return np.zeros(0, dtype=np.int64)
    if k >= mag.size:
        return np.flatnonzero(mag).astype(np.int64)
    pos = _candidates(mag, k, np.random.default_rng(seed))
    vals = mag[pos]
    thr = float(np.partition(vals, vals.size - k)[vals.size - k])
    return _select(mag, pos, thr, k)


def global_topk_indices(
    tensors: Mapping[str, np.ndarray], density: float, seed: int = 0
) -> dict[str, np.ndarray]:
    """Top-k over the concatenation of all tensors: one threshold, ``k = density * total``."""
    names = list(tensors)
    if not names:
        return {}
    mags = [np.abs(tensors[n].reshape(-1)).astype(np.float64, copy=False) for n in names]
    flat = np.concatenate(mags) if mags else np.zeros(0)
    k = k_for(flat.size, density)
    if flat.size == 0:
        return {n: np.zeros(0, dtype=np.int64) for n in names}
    if k >= flat.size:
        return {n: np.flatnonzero(m).astype(np.int64) for n, m in zip(names, mags, strict=True)}
    thr = _kth_largest(flat, k, np.random.default_rng(seed))
    # exact global k: count strictly-above per tensor, share the ties in name order
    out: dict[str, np.ndarray] = {}
    budget = k - int(np.count_nonzero(flat > thr))
    for name, mag in zip(names, mags, strict=True):
        above = np.flatnonzero(mag > thr)
        if budget > 0 and thr > 0:
            ties = np.flatnonzero(mag == thr)[:budget]
            budget -= ties.size
            above = np.sort(np.concatenate([above, ties]))
        out[name] = above.astype(np.int64)
    return out


def randomk_indices(numel: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct sorted positions in ``[0, numel)`` drawn from ``seed`` only.

    The decoder regenerates the same mask from ``(numel, k, seed)``; no index is transmitted.
    Selection only: the values at these positions are not rescaled here (see the module notes).
    """
    if k <= 0 or numel == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(numel, size=min(k, numel), replace=False)).astype(np.int64)


def dgc_warmup_density(
    server_round: int, final_density: float, schedule: Sequence[float] = ()
) -> float:
    """Density used at ``server_round`` (1-based) under a warm-up schedule.

    Parameters
    ----------
    server_round : int
        Current round; rounds past the schedule use ``final_density``.
    final_density : float
        Density after warm-up.
    schedule : Sequence[float]
        Densities of rounds 1, 2, ...; DGC uses ``(0.25, 0.0625, 0.015625, 0.004, 0.001)``.
    """
    if 1 <= server_round <= len(schedule):
        return max(float(schedule[server_round - 1]), final_density)
    return final_density
