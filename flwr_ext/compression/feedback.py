"""Error feedback and Deep Gradient Compression (DGC) on the client.

Error feedback (Seide et al. 2014; Stich et al. 2018) adds back what earlier rounds did not
send: with input ``g_t`` and residual ``e_t``::

    a_t = g_t + e_t,    sent_t = C(a_t),    e_{t+1} = a_t - sent_t

so ``sent_t + e_{t+1} = g_t + e_t`` exactly (the identity the tests check). This *residual*
error feedback is a different state from EF21's (:mod:`flwr_ext.compression.ef21`): the
residual is what has not been sent yet, and the server never sees it; EF21's ``g_i`` is a
running estimate of the update that the client and the server both hold.

Deep Gradient Compression (Lin, Han, Mao, Wang, Dally, "Deep Gradient Compression: Reducing
the Communication Bandwidth for Distributed Training", ICLR 2018, arXiv:1712.01887) adds four
things to top-k with local accumulation (:class:`DGCConfig`; all four are on in the ``dgc``
preset, clipping once ``clip_norm`` is set):

* **Local gradient clipping** (Sec. 3.2): clip each node's new gradient *before* it is added
  to the accumulation, at the node's share of the global threshold,
  ``thr_{G^k} = N^{-1/2} thr_G`` (``clip_norm`` is that per-node threshold; L2 over all the
  compressed float tensors of the update)::

      g_t <- g_t * min(1, clip_norm / ||g_t||_2)

* **Momentum correction** (Sec. 3.2): accumulate the velocity instead of the gradient::

      u_{k,t} = m u_{k,t-1} + g_{k,t},    v_{k,t} = v_{k,t-1} + u_{k,t},
      w_{t+1} = w_t - eta sum_k sparse(v_{k,t})

* **Momentum factor masking** (Sec. 3.3): where a coordinate was sent, reset both buffers so
  that a stale momentum does not keep pushing it::

      Mask <- |v_{k,t}| > thr,   v_{k,t} <- v_{k,t} * (not Mask),   u_{k,t} <- u_{k,t} * (not Mask)

  (``momentum_masking=False`` masks ``v`` only, which is plain error feedback on ``u``.)

* **Warm-up training** (Sec. 3.3): the sparsity grows exponentially over the first epochs,
  75 %, 93.75 %, 98.4375 %, 99.6 %, then 99.9 % (densities ``DGC_WARMUP`` then ``density``;
  :func:`~flwr_ext.compression.sparsify.dgc_warmup_density`). The paper also warms up the
  learning rate; that is the client's optimiser, not the compressor.

**How the paper's per-iteration quantities map to a Flower client mod.** DGC compresses one
mini-batch gradient ``g_{k,t}`` per iteration ``t``; in FL the mod sees one model delta per
round, ``delta_t = y_t - x_t`` (client model minus the model received), which is minus the
learning rate times the sum of the local gradients of the round. The mod uses ``delta_t`` for
``g_{k,t}`` (every step is linear, so the sign and the learning rate carry through):
``u <- m u + delta``, ``v <- v + u``, send top-k of ``v``, mask ``u`` and ``v`` where sent.
``t`` counts this client's compressed replies (kept in ``context.state``), so the warm-up runs
over its first 4 replies where the paper uses 4 epochs. One round of momentum-SGD local
training already contains the optimiser's momentum; correction on top acts like a server
step of about ``1/(1 - m)`` (docs/compression.md); with one plain SGD step per round
(FedSGD) the mod is exactly the paper's algorithm on node ``k``.

The state lives in plain dicts of arrays so that the client mod can keep it in
``context.state`` between rounds (as ArrayRecords): ``residual`` is ``e_t`` or DGC's ``v``,
``velocity`` DGC's ``u``.

With ``max_norm`` (client-side fixed clipping, where the server adds noise sized for C and
does not clip again) the decoded L2 norm of what is sent is checked against C *after*
compression, by decoding the payloads exactly as the server does; if it exceeds C the
compressor's input is scaled down and encoded again (every codec here is scale-equivariant for
a fixed seed), and an all-zero update is sent if that still fails. With error feedback the part
that was not sent stays in the client's residual (never on the wire). This is a different
bound from DGC's ``clip_norm``, which clips the *input* before accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .codec import PipelineConfig, decode_update, encode_update
from .errors import ConfigError
from .sparsify import dgc_warmup_density, k_for


@dataclass(frozen=True)
class DGCConfig(PipelineConfig):
    """A pipeline with DGC's local gradient clipping and momentum factor masking switch.

    Parameters
    ----------
    clip_norm : float
        Local gradient clipping threshold (L2, over the compressed float tensors of one
        update), applied before the update enters the momentum and the accumulation
        (Lin et al. 2018, Sec. 3.2: ``N^{-1/2}`` times the global threshold); 0 disables it.
    momentum_masking : bool
        Reset the momentum ``u`` where coordinates were sent (Sec. 3.3); the accumulation
        ``v`` is always reset there (that is error feedback).

    All other fields are :class:`~flwr_ext.compression.codec.PipelineConfig`'s.
    """

    clip_norm: float = 0.0
    momentum_masking: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0.0 <= self.clip_norm < float("inf")):
            raise ConfigError("clip_norm must be a finite number >= 0 (0 disables clipping)")


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


def clip_update(
    update: Mapping[str, np.ndarray], names: set[str], clip_norm: float
) -> dict[str, np.ndarray]:
    """DGC local gradient clipping: scale ``update[names]`` to L2 norm at most ``clip_norm``.

    ``g <- g * min(1, clip_norm / ||g||_2)`` with the norm over the tensors in ``names``
    (float64); the other tensors are returned as they are. ``clip_norm <= 0``: no clipping.
    """
    out = {n: np.asarray(x) for n, x in update.items()}
    if clip_norm <= 0:
        return out
    norm = float(np.sqrt(sum(float(np.sum(np.square(out[n], dtype=np.float64))) for n in names)))
    if norm <= clip_norm:
        return out
    factor = clip_norm / norm
    for n in names:
        out[n] = (out[n] * factor).astype(out[n].dtype)
    return out


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
    if isinstance(cfg, DGCConfig) and cfg.clip_norm > 0:
        update = clip_update(update, {n for n in floats if cfg.compresses(n)}, cfg.clip_norm)
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
        if cfg.momentum and (not isinstance(cfg, DGCConfig) or cfg.momentum_masking):
            # momentum factor masking (DGC Sec. 3.3): u <- u * (not Mask)
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
