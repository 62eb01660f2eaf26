"""The client's local-training recipe, as the server must replay it (one validated dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

LOSSES = ("cross-entropy",)


@dataclass(frozen=True)
class LocalRecipe:
    """How a client trains locally: plain mini-batch SGD (optionally with momentum).

    The conversion (Wang, Gao et al., "Tackling the Unlimited Staleness in Federated Learning
    with Intertwined Data and Device Heterogeneities", Sec. 4, eq. 3) replays this recipe on
    the synthetic data set, so it must be the one the clients ran.

    Parameters
    ----------
    steps : int
        Mini-batch steps of one local training (``>= 1``).
    lr : float
        SGD learning rate (``> 0``).
    batch_size : int
        Mini-batch size; the synthetic set is cut into consecutive batches of this size,
        cycled in order (as the reference's ``loss_steps``). ``0``: every step uses the whole set.
    momentum : float
        SGD momentum in ``[0, 1)`` with PyTorch's convention (``b <- mu b + g``,
        ``w <- w - lr b``, dampening 0, no Nesterov); 0: plain SGD.
    loss : str
        ``"cross-entropy"`` (against soft labels).
    """

    steps: int
    lr: float
    batch_size: int = 0
    momentum: float = 0.0
    loss: str = "cross-entropy"

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"LocalRecipe.steps must be an integer >= 1, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"LocalRecipe.lr must be > 0, got {self.lr!r}")
        if int(self.batch_size) != self.batch_size or self.batch_size < 0:
            raise ValueError(
                f"LocalRecipe.batch_size must be an integer >= 0, got {self.batch_size!r}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"LocalRecipe.momentum must be in [0, 1), got {self.momentum!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"LocalRecipe.loss must be one of {LOSSES}, got {self.loss!r}")
