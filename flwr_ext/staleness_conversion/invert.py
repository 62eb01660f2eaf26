"""Learn a synthetic data set whose local training reproduces a given update (the inversion).

Wang, Gao et al., "Tackling the Unlimited Staleness in Federated Learning with Intertwined
Data and Device Heterogeneities", Sec. 4, eq. 3-4:

    D_rec = argmin_D  || S(w^{t-tau}; D) - w^{t-tau} - Delta_i ||_1

with inputs initialised from noise and learnable soft labels (``softmax`` of free logits). As
the reference (pittisl/FL-with-intertwined-heterogeneity, ``fixed.py`` with
``inversefed.FedAvgReconstructor``: ``cost_fn='l1'``, ``signed=True``, ``optim='adam'``,
``lr_decay=True``, ``boxed=True``): Adam on the *signed* gradient of the inputs (the labels'
gradient is not signed), the learning rate divided by 10 at 3/8, 5/8 and 7/8 of the
iterations, and the inputs projected into their valid range after every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from flwr_ext.staleness_conversion.recipe import LocalRecipe
from flwr_ext.staleness_conversion.unroll import Tensors, unroll


@dataclass(frozen=True)
class InversionConfig:
    """Settings of the inversion (validated).

    Parameters
    ----------
    num_samples : int
        Size of ``D_rec`` (the reference uses 256 on MNIST).
    iterations : int
        Adam steps (the reference uses 40,000 on a GPU; a few hundred fit a CPU).
    lr : float
        Adam learning rate before decay.
    signed : bool
        Use the sign of the inputs' gradient (the reference's ``signed=True``).
    lr_decay : bool
        Divide the learning rate by 10 at 3/8, 5/8 and 7/8 of ``iterations``.
    input_low, input_high : float or None
        Box the inputs into ``[low, high]`` after every step (``None``: unbounded).
    seed : int
        Seed of the initial noise (``SeedSequence([seed, stream])``).
    """

    num_samples: int = 64
    iterations: int = 200
    lr: float = 0.1
    signed: bool = True
    lr_decay: bool = True
    input_low: float | None = 0.0
    input_high: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"InversionConfig.num_samples must be >= 1, got {self.num_samples}")
        if self.iterations < 1:
            raise ValueError(f"InversionConfig.iterations must be >= 1, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"InversionConfig.lr must be > 0, got {self.lr}")
        lo, hi = self.input_low, self.input_high
        if lo is not None and hi is not None and not lo < hi:
            raise ValueError("InversionConfig.input_low must be < input_high")


@dataclass
class Reconstruction:
    """The learned ``D_rec``: inputs, soft labels, and the final L1 matching loss."""

    x: torch.Tensor
    target: torch.Tensor
    loss: float


def _generator(seed: int, stream: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, stream]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _box(x: torch.Tensor, cfg: InversionConfig) -> torch.Tensor:
    if cfg.input_low is None and cfg.input_high is None:
        return x
    return x.clamp(cfg.input_low, cfg.input_high)


def invert(
    model: nn.Module,
    base: Tensors,
    delta: Tensors,
    recipe: LocalRecipe,
    input_shape: tuple[int, ...],
    num_classes: int,
    config: InversionConfig,
    *,
    stream: int = 0,
) -> Reconstruction:
    """Fit ``D_rec`` so that ``S(base; D_rec) - base`` matches ``delta`` in L1 (eq. 3-4).

    Parameters
    ----------
    model : nn.Module
        The architecture (its parameters are not used).
    base, delta : dict of str to Tensor
        ``w^{t-tau}`` and ``Delta_i`` by parameter name (float tensors, no grad).
    recipe : LocalRecipe
        The client's local training.
    input_shape : tuple of int
        Shape of one input (without the batch dimension).
    num_classes : int
        Width of the soft labels.
    config : InversionConfig
        Inversion settings.
    stream : int
        Second seed component (e.g. the update's index), so conversions draw distinct noise.
    """
    gen = _generator(config.seed, stream)
    shape = (config.num_samples, *input_shape)
    if config.input_low is not None and config.input_high is not None:
        x = config.input_low + (config.input_high - config.input_low) * torch.rand(
            shape, generator=gen
        )
    else:
        x = torch.randn(shape, generator=gen)
    x.requires_grad_(True)
    logits = torch.randn((config.num_samples, num_classes), generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x, logits], lr=config.lr)
    sched = None
    if config.lr_decay:
        n = config.iterations
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[int(n * 3 / 8), int(n * 5 / 8), int(n * 7 / 8)], gamma=0.1
        )
    names = list(delta)
    loss_value = float("inf")
    for _ in range(config.iterations):
        opt.zero_grad()
        out = unroll(model, base, x, torch.softmax(logits, dim=1), recipe)
        loss = sum((out[n] - base[n] - delta[n]).abs().sum() for n in names)
        loss.backward()
        if config.signed:
            x.grad.sign_()
        opt.step()
        if sched is not None:
            sched.step()
        with torch.no_grad():
            x.copy_(_box(x, config))
        loss_value = float(loss.detach())
    return Reconstruction(x.detach(), torch.softmax(logits, dim=1).detach(), loss_value)
