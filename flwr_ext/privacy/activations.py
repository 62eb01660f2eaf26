"""Tempered activations for DP-SGD models.

Under DP-SGD, bounded activations keep per-example gradients small and well spread, so fewer
of them are clipped hard and the clipped, noised update carries more signal. Replacing ReLU by
tanh (the tempered sigmoid with s=2, T=2, o=1) is the change Papernot et al. recommend.

References
----------
Papernot, Thakurta, Song, Chien, Erlingsson, "Tempered Sigmoid Activations for Deep Learning
with Differential Privacy", AAAI 2021 (Sec. 4, Eq. 2: tanh is the tempered sigmoid
``s * sigmoid(T x) - o`` with ``s=2, T=2, o=1``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh}
"""Activation names accepted by :func:`replace_activations` (run-config values)."""


def replace_activations(
    module: nn.Module, activation: str = "tanh", old: type[nn.Module] = nn.ReLU
) -> int:
    """Replace every ``old`` activation module inside ``module`` in place.

    Activations hold no parameters, so the state dict (and the federated wire format) is
    unchanged. Call it before :meth:`DPLoRAEngine.make_private`.

    Parameters
    ----------
    module : nn.Module
        The model; changed in place.
    activation : {"relu", "tanh"}
        The new activation. ``"relu"`` leaves a ReLU model as it is.
    old : type
        The activation class to replace.

    Returns
    -------
    int
        How many modules were replaced.
    """
    try:
        factory = ACTIVATIONS[activation]
    except KeyError:
        allowed = sorted(ACTIVATIONS)
        raise ValueError(f"activation must be one of {allowed}, not {activation!r}") from None
    replaced = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, old) and not isinstance(child, factory):
                setattr(parent, name, factory())
                replaced += 1
    return replaced
