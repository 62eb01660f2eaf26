"""Baselines the conversion is compared with: staleness weights and delay compensation.

Wang, Gao et al., "Tackling the Unlimited Staleness ..." compare against (reference
``fixed.py``, options ``dc = 2, 3, 4``): the raw stale update, DC-ASGD style first-order delay
compensation (Zheng et al., "Asynchronous Stochastic Gradient Descent with Delay Compensation",
ICML 2017, eq. 6, applied to the update) and the weight ``2^(-tau/20)``.
"""

from __future__ import annotations

import numpy as np

from flwr_ext.asyncfl.types import Params
from flwr_ext.staleness import exponential


def dc_asgd(delta: Params, current: Params, stale_base: Params, lam: float = 4.0) -> Params:
    """``Delta - lam * Delta * Delta * (w^t - w^{t-tau})`` element-wise (reference ``dc == 3``)."""
    out: Params = {}
    for k, d in delta.items():
        d64 = np.asarray(d, dtype=np.float64)
        drift = np.asarray(current[k], dtype=np.float64) - np.asarray(stale_base[k], np.float64)
        out[k] = (d64 - lam * d64 * d64 * drift).astype(np.asarray(d).dtype)
    return out


def exp2_weight(staleness: int, half_life: float = 20.0) -> float:
    """``2^(-tau / half_life)``: the reference's staleness weight (``dc == 4``, half-life 20).

    :func:`flwr_ext.staleness.exponential` (the ``staleness = "exponential"`` option) evaluated
    at ``staleness``.
    """
    return exponential(half_life)(staleness)
