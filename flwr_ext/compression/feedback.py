"""Error feedback with optional DGC momentum correction.

Error feedback (Seide et al. 2014; Stich et al. 2018) adds back what earlier rounds did not
send: with input ``g_t`` and residual ``e_t``::

    a_t = g_t + e_t,    sent_t = C(a_t),    e_{t+1} = a_t - sent_t

so ``sent_t + e_{t+1} = g_t + e_t`` exactly (the identity the tests check).

DGC momentum correction (Lin et al., ICLR 2018, Sec. 3.2, Eq. (6)-(7)) accumulates the
*velocity* instead of the raw update, and masks both buffers where coordinates were sent
(momentum factor masking, Sec. 3.3)::

    u_t = m u_{t-1} + g_t,    v_t = v_{t-1} + u_t,    sent_t = C(v_t),
    v_{t+1} = v_t - sent_t,   u_t <- u_t * (1 - mask_t)

The state lives in plain dicts of arrays so that the client mod can keep it in
``context.state`` between rounds (as ArrayRecords).

With ``max_norm`` (client-side fixed clipping, where the server adds noise sized for C and
does not clip again) the decoded L2 norm of what is sent is checked against C *after*
compression, by decoding the payloads exactly as the server does; if it exceeds C the
compressor's input is scaled down and encoded again (every codec here is scale-equivariant for
a fixed seed), and an all-zero update is sent if that still fails. With error feedback the part
that was not sent stays in the client's residual (never on the wire).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .codec import PipelineConfig, decode_update, encode_update
from .sparsify import dgc_warmup_density, k_for


@dataclass
class CompressionState:
    """State of one client's compressor (PyTorch ``ddp_comm_hooks`` style).

    Parameters
    ----------
    config : PipelineConfig
        The pipeline.
    residual : dict[str, np.ndarray]
        Error-feedback residual ``e_t`` (or DGC's ``v_t``) by tensor name.
    velocity : dict[str, np.ndarray]
        DGC momentum buffer ``u_t`` by tensor name (empty without momentum correction).
    """

    config: PipelineConfig
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    velocity: dict[str, np.ndarray] = field(default_factory=dict)


def _like(buf: Mapping[str, np.ndarray], name: str, x: np.ndarray) -> np.ndarray:
    old = buf.get(name)
    if old is None or old.shape != x.shape or old.dtype != x.dtype:
        return np.zeros_like(x)
    return old


def compress(
    state: CompressionState,
    update: Mapping[str, np.ndarray],
    *,
    server_round: int = 0,
    seed: int = 0,
    max_norm: float | None = None,
) -> dict[str, bytes]:
    """Encode ``update`` and advance ``state`` (residual, velocity) in place.

    Parameters
    ----------
    state : CompressionState
        Compressor state; updated in place.
    update : Mapping[str, np.ndarray]
        The update (delta) to send.
    server_round : int
        Round number, for the warm-up schedule.
    seed : int
        Seed of the stochastic stages.
    max_norm : float or None
        Bound on the L2 norm (over all tensors) of the *decoded* payloads; ``None``: no bound.

    Returns
    -------
    dict[str, bytes]
        One payload per tensor.
    """
    cfg = state.config
    density = dgc_warmup_density(server_round, cfg.density, cfg.warmup)
    floats = {n for n, x in update.items() if np.asarray(x).dtype.kind == "f"}
    if not cfg.error_feedback:
        update = randomk_unbiased(update, cfg, density)
        if max_norm is None:
            payloads, _ = encode_update(update, cfg, seed=seed, density=density, reconstruct=False)
            return payloads
        return bounded_encode(update, cfg, max_norm, seed=seed, density=density)[0]
    acc: dict[str, np.ndarray] = {}
    for name, x in update.items():
        x = np.asarray(x)
        if name not in floats or not cfg.compresses(name):
            acc[name] = x
            continue
        if cfg.momentum:
            u = cfg.momentum * _like(state.velocity, name, x) + x
            state.velocity[name] = u
            acc[name] = _like(state.residual, name, x) + u
        else:
            acc[name] = _like(state.residual, name, x) + x
    if max_norm is None:
        payloads, recon = encode_update(acc, cfg, seed=seed, density=density)
    else:
        payloads, recon = bounded_encode(acc, cfg, max_norm, seed=seed, density=density)
    for name in acc:
        if name not in floats or not cfg.compresses(name):
            continue
        state.residual[name] = acc[name] - recon[name]
        if cfg.momentum:
            state.velocity[name] = np.where(recon[name] != 0, 0, state.velocity[name]).astype(
                state.velocity[name].dtype
            )
    # forget tensors that are no longer part of the update
    for buf in (state.residual, state.velocity):
        for name in [n for n in buf if n not in update]:
            del buf[name]
    return payloads


def randomk_unbiased(
    update: Mapping[str, np.ndarray], config: PipelineConfig, density: float
) -> Mapping[str, np.ndarray]:
    """Scale the tensors that random-k will sparsify by ``numel / k`` (unbiased estimator).

    Random-k keeps ``k`` of ``numel`` coordinates chosen independently of the data; scaled by
    ``numel / k`` the decoded tensor's expectation is the input (Stich et al. 2018, "rand-k").
    Used without error feedback only: with error feedback the unscaled (biased) mask is right,
    because what is not sent stays in the residual and is sent later.
    """
    if config.sparsify != "randomk":
        return update
    out = {}
    for name, x in update.items():
        x = np.asarray(x)
        numel = x.size
        if config.compresses(name) and x.dtype.kind == "f" and numel >= config.dense_below:
            k = k_for(numel, density)
            x = (x * (numel / k)).astype(x.dtype) if k else x
        out[name] = x
    return out


def decoded_norm(payloads: Mapping[str, bytes]) -> tuple[float, dict[str, np.ndarray]]:
    """L2 norm (float64, over all tensors) of the payloads as the server decodes them."""
    decoded = decode_update(payloads)
    norm = float(
        np.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in decoded.values()))
    )
    return norm, decoded


def bounded_encode(
    update: Mapping[str, np.ndarray],
    config: PipelineConfig,
    max_norm: float,
    *,
    seed: int = 0,
    density: float | None = None,
    attempts: int = 4,
) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Encode ``update`` so that its decoded L2 norm is at most ``max_norm``.

    Returns ``(payloads, decoded)``: ``decoded`` is what the server will decode (use it for the
    error-feedback residual). The input is scaled by ``max_norm / norm(decoded)`` (with a
    margin that grows per attempt) and re-encoded with the same seed until the decoded norm
    fits; after ``attempts`` an all-zero update is encoded, whose norm is 0.
    """
    if not max_norm > 0:
        raise ValueError("max_norm must be positive")
    x = {n: np.asarray(v) for n, v in update.items()}
    for attempt in range(attempts):
        payloads, _ = encode_update(x, config, seed=seed, density=density, reconstruct=False)
        norm, decoded = decoded_norm(payloads)
        if norm <= max_norm:
            return payloads, decoded
        factor = max_norm / norm * (1.0 - 1e-6 * 10**attempt)
        x = {n: (v * factor).astype(v.dtype) if v.dtype.kind == "f" else v for n, v in x.items()}
    zeros = {n: np.zeros_like(v) for n, v in x.items()}
    payloads, _ = encode_update(zeros, config, seed=seed, density=density, reconstruct=False)
    return payloads, decode_update(payloads)
