"""Refusals: models the unrolled recipe cannot replay, and runs where inversion is not allowed."""

from __future__ import annotations

from torch import nn

#: Layers whose training-mode behaviour (batch statistics, random masks) breaks the
#: deterministic, differentiable replay of the client's local training.
_REFUSED = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd, nn.AlphaDropout)


class ConversionRefused(ValueError):
    """The conversion cannot (model) or must not (privacy settings) run."""


def check_model(model: nn.Module) -> None:
    """Raise :class:`ConversionRefused` naming the first BatchNorm / dropout module of ``model``.

    BatchNorm couples the samples of a batch and keeps running statistics that the client's
    training changes; dropout draws random masks the server cannot reproduce. Either makes the
    replayed training differ from the client's, so the inversion would fit the wrong map.
    """
    for name, module in model.named_modules():
        if isinstance(module, _REFUSED):
            raise ConversionRefused(
                f"stale-update conversion cannot replay local training through module "
                f"{name or '<root>'!r} ({type(module).__name__}): BatchNorm and dropout make "
                f"it non-deterministic or batch-coupled; use a model without them"
            )


def check_privacy(*, dp: bool = False, secure_aggregation: bool = False) -> None:
    """Refuse the conversion when differential privacy or secure aggregation is on.

    The conversion reconstructs a synthetic copy of a client's data from its individual
    update at the server: with DP the update is noised (and the reconstruction would be a
    post-processing that users did not agree to), with secure aggregation the server must
    not see individual updates at all.
    """
    if dp:
        raise ConversionRefused(
            "stale-update conversion reconstructs client data from individual updates; "
            "it is refused when differential privacy is on"
        )
    if secure_aggregation:
        raise ConversionRefused(
            "stale-update conversion needs individual client updates; "
            "it is refused when secure aggregation is on"
        )
