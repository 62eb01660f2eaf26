"""Staleness weight functions for asynchronous aggregation.

An update computed on model version ``v`` and applied when the server is at version ``t`` has
staleness ``s = t - v``. Asynchronous strategies scale it by ``w(s)``:

* constant: ``w(s) = 1`` (Xie et al. 2019, "Asynchronous Federated Optimization", Sec. 5.2),
* polynomial: ``w(s) = (1 + s)^(-a)`` (Xie et al. 2019, eq. in Sec. 5.2; FedBuff, Nguyen et
  al. AISTATS 2022, Sec. 3 uses ``1 / sqrt(1 + s)``, i.e. ``a = 0.5``; FedCompass, Li et al.
  ICLR 2024, eq. 3 uses the same form),
* hinge: ``w(s) = 1`` if ``s <= b`` else ``1 / (a (s - b) + 1)`` (Xie et al. 2019, Sec. 5.2),
* exponential: ``w(s) = 2^(-s / a)``, half-life ``a`` (Wang, Gao et al., "Tackling the Unlimited
  Staleness in Federated Learning with Intertwined Data and Device Heterogeneities", reference
  code ``fixed.py`` option ``dc == 4``: ``a = 20``).

Every function returns ``0`` above ``max_staleness`` (the cut-off): strategies treat a zero
weight as "reject the update as too stale".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

StalenessFn = Callable[[int], float]

#: The staleness functions (``staleness`` run-config key).
KINDS = ("constant", "polynomial", "hinge", "exponential")


@dataclass(frozen=True)
class Staleness:
    """A staleness weight ``w(s)`` with an optional cut-off.

    Parameters
    ----------
    kind : str
        ``"constant"``, ``"polynomial"``, ``"hinge"`` or ``"exponential"``.
    a : float
        Exponent of the polynomial, slope of the hinge, or half-life of the exponential.
    b : int
        Hinge point (staleness up to ``b`` is not penalised).
    max_staleness : int or None
        Updates with staleness above this get weight 0 (rejected). ``None``: no cut-off.
    """

    kind: str = "polynomial"
    a: float = 0.5
    b: int = 4
    max_staleness: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown staleness function {self.kind!r}")
        if self.a < 0:
            raise ValueError("a must be >= 0")
        if self.kind == "exponential" and not self.a > 0:
            raise ValueError("the exponential's half-life a must be > 0")

    def __call__(self, s: int) -> float:
        """Weight of an update with staleness ``s`` (``s >= 0``)."""
        if s < 0:
            raise ValueError(f"negative staleness {s}")
        if self.max_staleness is not None and s > self.max_staleness:
            return 0.0
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float(math.pow(1.0 + s, -self.a))
        if self.kind == "exponential":
            return float(2.0 ** (-s / self.a))
        return 1.0 if s <= self.b else 1.0 / (self.a * (s - self.b) + 1.0)


def constant(max_staleness: int | None = None) -> Staleness:
    """``w(s) = 1`` (no staleness penalty)."""
    return Staleness("constant", max_staleness=max_staleness)


def polynomial(a: float = 0.5, max_staleness: int | None = None) -> Staleness:
    """``w(s) = (1 + s)^(-a)`` (Xie et al. 2019, Sec. 5.2)."""
    return Staleness("polynomial", a=a, max_staleness=max_staleness)


def hinge(a: float = 10.0, b: int = 4, max_staleness: int | None = None) -> Staleness:
    """``w(s) = 1`` for ``s <= b`` else ``1 / (a (s - b) + 1)`` (Xie et al. 2019, Sec. 5.2)."""
    return Staleness("hinge", a=a, b=b, max_staleness=max_staleness)


def exponential(half_life: float = 20.0, max_staleness: int | None = None) -> Staleness:
    """``w(s) = 2^(-s / half_life)`` (the unlimited-staleness reference's ``2^(-tau/20)``)."""
    return Staleness("exponential", a=half_life, max_staleness=max_staleness)


def from_config(
    kind: str, a: float = 0.5, b: int = 4, max_staleness: int | None = None
) -> Staleness:
    """Build a :class:`Staleness` from run-config values (``max_staleness < 0``: no cut-off)."""
    if max_staleness is not None and max_staleness < 0:
        max_staleness = None
    return Staleness(kind, a=a, b=b, max_staleness=max_staleness)


#: ``staleness-a`` when a run config does not set it: Xie et al.'s default for each function
#: (polynomial ``a = 0.5``; hinge ``a = 10``, ``b = 4``, as :func:`hinge`); exponential: the
#: half-life 20 of the unlimited-staleness reference.
DEFAULT_A = {"constant": 0.5, "polynomial": 0.5, "hinge": 10.0, "exponential": 20.0}


def from_run_config(cfg: Mapping[str, Any]) -> Staleness:
    """The staleness function of a Flower run config.

    Keys: ``staleness`` (constant|polynomial|hinge|exponential, default polynomial), ``staleness-a``
    (default per function: :data:`DEFAULT_A`), ``staleness-b`` (default 4), ``max-staleness``
    (< 0 or missing: no cut-off).
    """
    kind = str(cfg.get("staleness", "polynomial"))
    return from_config(
        kind,
        a=float(cfg.get("staleness-a", DEFAULT_A.get(kind, 0.5))),
        b=int(cfg.get("staleness-b", 4)),
        max_staleness=int(cfg.get("max-staleness", -1)),
    )
