"""Server optimizers: how a strategy turns its aggregated client delta into the next model.

Every strategy here aggregates *deltas* (client model minus the model it was sent), so the
server step ``s`` points downhill and the plain update is ``x <- x + lr * s``; the
pseudo-gradient of the optimisation literature is ``g = -s`` (Reddi et al., "Adaptive
Federated Optimization", ICLR 2021, Alg. 2). An optimizer is a small object with
:meth:`ServerOptimizer.step` and :meth:`ServerOptimizer.reset`; its state lives in plain
attributes (``buffer``), so a strategy that holds it as a ``_``-prefixed attribute checkpoints
it with its default ``state_dict``.

All arithmetic goes through :mod:`flwr_ext.asyncfl.aggregate` (float64 accumulation, each
tensor returned in its own dtype).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from flwr_ext.asyncfl.aggregate import Params, add_scaled, weighted_delta

#: Names accepted by :func:`make_server_opt` (run-config key ``server-opt``).
SERVER_OPTS = ("plain", "momentum", "adaptive-braking", "nesterov")


@runtime_checkable
class ServerOptimizer(Protocol):
    """``step(params, delta) -> new params``; ``delta`` is the aggregated client delta."""

    def step(self, params: Params, delta: Params) -> Params:
        """Return the next model (inputs untouched)."""
        ...

    def reset(self) -> None:
        """Forget the state (a new run)."""
        ...


def _check_lr(lr: float) -> float:
    if not (math.isfinite(lr) and lr > 0.0):
        raise ValueError(f"server lr must be > 0, got {lr!r}")
    return float(lr)


def _check_beta(beta: float) -> float:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"server momentum beta must be in [0, 1), got {beta!r}")
    return float(beta)


class Plain:
    """``x <- x + lr * s`` (FedAvg's server step with a global learning rate).

    Parameters
    ----------
    lr : float
        ``eta_g`` > 0.
    """

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = _check_lr(lr)
        self.buffer: Params | None = None  # stateless; kept for a uniform interface

    def __repr__(self) -> str:
        return f"Plain(lr={self.lr})"

    def reset(self) -> None:
        """Nothing to forget."""

    def step(self, params: Params, delta: Params) -> Params:
        """``x + lr * s``."""
        return add_scaled(params, delta, self.lr)


class Momentum:
    """Server momentum (FedAvgM): ``m <- beta m + s``; ``x <- x + lr m``.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019 (FedAvgM), as FedBuff's Sec. 5 uses it. The first step sets
    ``m = s`` (``beta * 0 + s``), exactly as FedBuff's server momentum always did.

    Parameters
    ----------
    lr : float
        ``eta_g`` > 0.
    beta : float
        Momentum in [0, 1).
    """

    def __init__(self, lr: float = 1.0, beta: float = 0.9) -> None:
        self.lr = _check_lr(lr)
        self.beta = _check_beta(beta)
        self.buffer: Params | None = None

    def __repr__(self) -> str:
        return f"Momentum(lr={self.lr}, beta={self.beta})"

    def reset(self) -> None:
        """Zero momentum."""
        self.buffer = None

    def step(self, params: Params, delta: Params) -> Params:
        """``m <- beta m + s``; ``x + lr m``."""
        self.buffer = delta if self.buffer is None else add_scaled(delta, self.buffer, self.beta)
        return add_scaled(params, self.buffer, self.lr)


class Nesterov:
    """The outer Nesterov step of DiLoCo: ``m <- beta m + s``; ``x <- x + lr (s + beta m)``.

    Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
    2023, https://arxiv.org/abs/2311.08105, Alg. 1 line 12 (OuterOpt = Nesterov momentum, with
    lr 0.7 and momentum 0.9 in Sec. 3), in the form of PyTorch's ``SGD(nesterov=True)``
    (``b <- mu b + g``; ``theta <- theta - lr (g + mu b)``) written for ``s = -g``.

    Parameters
    ----------
    lr : float
        Outer learning rate > 0 (0.7 in DiLoCo).
    beta : float
        Momentum in [0, 1) (0.9 in DiLoCo).
    """

    def __init__(self, lr: float = 0.7, beta: float = 0.9) -> None:
        self.lr = _check_lr(lr)
        self.beta = _check_beta(beta)
        self.buffer: Params | None = None

    def __repr__(self) -> str:
        return f"Nesterov(lr={self.lr}, beta={self.beta})"

    def reset(self) -> None:
        """Zero momentum."""
        self.buffer = None

    def step(self, params: Params, delta: Params) -> Params:
        """``m <- beta m + s``; ``x + lr (s + beta m)``."""
        self.buffer = delta if self.buffer is None else add_scaled(delta, self.buffer, self.beta)
        look_ahead = add_scaled(delta, self.buffer, self.beta)
        return add_scaled(params, look_ahead, self.lr)


def cosine(a: Params, b: Params) -> float:
    """Cosine similarity of two models flattened into one vector (float64); 0 if either is 0."""
    dot = na = nb = 0.0
    for k in a:
        x = np.asarray(a[k], dtype=np.float64).reshape(-1)
        y = np.asarray(b[k], dtype=np.float64).reshape(-1)
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return dot / math.sqrt(na * nb)


class AdaptiveBraking:
    """Momentum SGD with Adaptive Braking (AB) on the server's pseudo-gradient.

    Venigalla, Kosson, Chiley and Koester, "Adaptive Braking for Mitigating Gradient Delay",
    ICML 2020 workshop, https://arxiv.org/abs/2007.01397: a delayed gradient ``g`` is scaled
    by its alignment with the velocity ``v`` before it enters momentum SGD,

        g_hat = (1 - rho * cos(g, v)) g;   v <- beta v + g_hat;   x <- x - lr v,

    so a gradient pointing along the velocity (the overshoot that delay causes on
    high-curvature directions) is braked, one pointing against it is amplified. With the
    delta convention ``g = -s`` and the velocity stored as ``u = -v`` this is

        u <- beta u + (1 - rho * cos(s, u)) s;   x <- x + lr u

    (``cos(g, v) = cos(s, u)``: the sign convention does not change the brake). The cosine is
    taken over the whole model flattened into one vector; before the first step ``u = 0`` and
    the cosine is 0 (no brake). Note: only the abstract of the paper could be read here; the
    form follows it and the issue's statement; ``rho = 2`` is the paper's choice as recalled,
    not checked against its text.

    Parameters
    ----------
    lr : float
        ``eta`` > 0.
    beta : float
        Momentum ``m`` in [0, 1).
    rho : float
        Braking strength >= 0 (0: plain momentum).
    """

    def __init__(self, lr: float = 1.0, beta: float = 0.9, rho: float = 2.0) -> None:
        self.lr = _check_lr(lr)
        self.beta = _check_beta(beta)
        if not (math.isfinite(rho) and rho >= 0.0):
            raise ValueError(f"rho must be >= 0, got {rho!r}")
        self.rho = float(rho)
        self.buffer: Params | None = None
        self.last_cosine = 0.0

    def __repr__(self) -> str:
        return f"AdaptiveBraking(lr={self.lr}, beta={self.beta}, rho={self.rho})"

    def reset(self) -> None:
        """Zero velocity."""
        self.buffer = None
        self.last_cosine = 0.0

    def step(self, params: Params, delta: Params) -> Params:
        """``u <- beta u + (1 - rho cos(s, u)) s``; ``x + lr u``."""
        if self.buffer is None:
            self.last_cosine = 0.0
            self.buffer = weighted_delta([delta], [1.0])
        else:
            self.last_cosine = cosine(delta, self.buffer)
            brake = 1.0 - self.rho * self.last_cosine
            self.buffer = weighted_delta([delta, self.buffer], [brake, self.beta])
        return add_scaled(params, self.buffer, self.lr)


def make_server_opt(
    name: str, lr: float = 1.0, beta: float = 0.9, rho: float = 2.0
) -> ServerOptimizer:
    """The optimizer named ``name`` (one of :data:`SERVER_OPTS`)."""
    key = name.strip().lower()
    if key == "plain":
        return Plain(lr)
    if key == "momentum":
        return Momentum(lr, beta)
    if key == "adaptive-braking":
        return AdaptiveBraking(lr, beta, rho)
    if key == "nesterov":
        return Nesterov(lr, beta)
    raise ValueError(f"unknown server optimizer {name!r}; one of {SERVER_OPTS}")
