"""Convert a stale update into the update the client would send from the current model.

Wang, Gao et al., "Tackling the Unlimited Staleness in Federated Learning with Intertwined
Data and Device Heterogeneities", Sec. 4 (eq. 3-5): learn ``D_rec`` from the stale update
(:func:`~flwr_ext.staleness_conversion.invert.invert`), then estimate the fresh update as

    Delta_i^t ~= S(w^t; D_rec) - w^t                                           (eq. 5)

The reference decides when to trust the conversion with an oracle (it retrains the real client
at ``w^t`` and compares). Here the server's own criterion is the inversion's *relative
residual*

    r = || S(w^{t-tau}; D_rec) - w^{t-tau} - Delta_i ||_2 / || Delta_i ||_2

(how well ``D_rec`` explains the update it was fitted to); :attr:`Conversion.accepted` is
``r <= max_residual``, otherwise the caller keeps the stale update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flwr_ext.asyncfl.types import Params
from flwr_ext.staleness_conversion.guards import check_model
from flwr_ext.staleness_conversion.invert import InversionConfig, Reconstruction, invert
from flwr_ext.staleness_conversion.recipe import LocalRecipe
from flwr_ext.staleness_conversion.unroll import Tensors, unroll


@dataclass
class Conversion:
    """The result of :func:`convert_update`.

    Attributes
    ----------
    delta : Params
        ``S(w^t; D_rec) - w^t`` (keys that are not parameters keep the stale delta).
    residual : float
        Relative residual ``r`` of the inversion (lower is better; 0: exact).
    accepted : bool
        ``residual <= max_residual``: use :attr:`delta`, else fall back to the stale update.
    seconds : float
        Thread CPU time the conversion took (what a virtual clock should be charged).
    reconstruction : Reconstruction
        The learned synthetic data set.
    """

    delta: Params
    residual: float
    accepted: bool
    seconds: float
    reconstruction: Reconstruction


def _to_torch(params: Params, names: list[str]) -> Tensors:
    return {n: torch.from_numpy(np.array(params[n], dtype=np.float32)) for n in names}


def relative_residual(model: nn.Module, base: Tensors, delta: Tensors, rec, recipe) -> float:
    """``||S(base; D_rec) - base - delta||_2 / ||delta||_2`` (no graph kept)."""
    with torch.enable_grad():
        out = unroll(model, base, rec.x, rec.target, recipe, create_graph=False)
    num = sum(float(((out[n].detach() - base[n] - delta[n]) ** 2).sum()) for n in delta)
    den = sum(float((delta[n] ** 2).sum()) for n in delta)
    return float(np.sqrt(num / den)) if den > 0 else float("inf")


def convert_update(
    model_fn: Callable[[], nn.Module],
    recipe: LocalRecipe,
    stale_base: Params,
    stale_delta: Params,
    current: Params,
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    config: InversionConfig | None = None,
    max_residual: float = 0.5,
    stream: int = 0,
) -> Conversion:
    """Convert ``stale_delta`` (trained from ``stale_base``) into a fresh update at ``current``.

    Parameters
    ----------
    model_fn : callable
        Builds the model (a ``torch.nn.Module``; no BatchNorm / dropout).
    recipe : LocalRecipe
        The client's local training (steps, lr, batch size, momentum).
    stale_base, stale_delta, current : Params
        ``w^{t-tau}``, ``Delta_i = w_i - w^{t-tau}`` and ``w^t`` (NumPy arrays by state-dict key).
    input_shape : tuple of int
        Shape of one input, e.g. ``(1, 8, 8)``.
    num_classes : int
        Number of classes (width of the soft labels).
    config : InversionConfig, optional
        Inversion settings (default: :class:`InversionConfig`).
    max_residual : float
        Acceptance threshold on the relative residual.
    stream : int
        Seed stream of this conversion.

    Returns
    -------
    Conversion
        The converted update and its quality.

    Raises
    ------
    ConversionRefused
        If the model has BatchNorm or dropout.
    """
    t0 = time.thread_time()
    cfg = config if config is not None else InversionConfig()
    model = model_fn()
    check_model(model)
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in stale_delta or n not in current]
    if missing:
        raise KeyError(f"parameters missing from the update or the model: {missing}")
    base_t = _to_torch(stale_base, names)
    delta_t = _to_torch(stale_delta, names)
    rec = invert(model, base_t, delta_t, recipe, input_shape, num_classes, cfg, stream=stream)
    residual = relative_residual(model, base_t, delta_t, rec, recipe)
    cur_t = _to_torch(current, names)
    with torch.enable_grad():
        fresh = unroll(model, cur_t, rec.x, rec.target, recipe, create_graph=False)
    delta: Params = {k: np.asarray(v) for k, v in stale_delta.items()}
    for n in names:
        d = (fresh[n].detach() - cur_t[n]).numpy()
        delta[n] = d.astype(np.asarray(stale_delta[n]).dtype, copy=False)
    return Conversion(
        delta=delta,
        residual=residual,
        accepted=residual <= max_residual,
        seconds=time.thread_time() - t0,
        reconstruction=rec,
    )
