"""The client's local training, unrolled differentiably: ``S(w; D)`` of the conversion.

Wang, Gao et al., "Tackling the Unlimited Staleness in Federated Learning with Intertwined
Data and Device Heterogeneities", Sec. 4, eq. 3: ``S(w; D)`` is the model the client's recipe
produces from ``w`` on data ``D``. Written with :func:`torch.func.functional_call`, so the result
is a differentiable function of both the starting weights and the (synthetic) data.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from flwr_ext.staleness_conversion.recipe import LocalRecipe

Tensors = dict[str, torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against probability targets (one-hot targets: the usual CE)."""
    return -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def batch_slices(n: int, recipe: LocalRecipe) -> list[slice]:
    """The batch of each step: consecutive slices of ``batch_size``, cycled in order.

    As the reference's ``loss_steps`` (step ``i`` uses batch ``i mod (n // B)``); with
    ``batch_size`` 0 or ``>= n`` every step uses the whole set.
    """
    b = recipe.batch_size
    if b == 0 or b >= n:
        return [slice(0, n)] * recipe.steps
    nb = n // b
    return [slice((i % nb) * b, (i % nb + 1) * b) for i in range(recipe.steps)]


def unroll(
    model: nn.Module,
    params: Tensors,
    x: torch.Tensor,
    target: torch.Tensor,
    recipe: LocalRecipe,
    *,
    create_graph: bool = True,
) -> Tensors:
    """``S(params; (x, target))``: ``recipe.steps`` SGD steps from ``params``, differentiable.

    Parameters
    ----------
    model : nn.Module
        Supplies the architecture (and its buffers); its own parameters are not used.
    params : dict of str to Tensor
        Starting weights ``w`` by parameter name (every ``model.named_parameters()`` name).
    x, target : Tensor
        Inputs and probability targets (rows summing to 1).
    recipe : LocalRecipe
        Steps, learning rate, batch size and momentum of the client's SGD.
    create_graph : bool
        Keep the graph through the gradients (needed to differentiate the result).

    Returns
    -------
    dict of str to Tensor
        The weights after local training.
    """
    names = [n for n, _ in model.named_parameters()]
    buffers = dict(model.named_buffers())
    w = {n: params[n] for n in names}
    if not create_graph:
        w = {n: t.detach().requires_grad_(True) for n, t in w.items()}
    else:  # a constant start (the server's model) becomes a leaf the gradients can be taken at
        w = {n: t if t.requires_grad else t.detach().requires_grad_(True) for n, t in w.items()}
    mom: Tensors | None = None
    for sl in batch_slices(len(x), recipe):
        out = functional_call(model, {**w, **buffers}, (x[sl],))
        loss = soft_cross_entropy(out, target[sl])
        grads = torch.autograd.grad(loss, [w[n] for n in names], create_graph=create_graph)
        g = dict(zip(names, grads, strict=True))
        if recipe.momentum > 0.0:
            mom = g if mom is None else {n: recipe.momentum * mom[n] + g[n] for n in names}
            g = mom
        w = {n: w[n] - recipe.lr * g[n] for n in names}
        if not create_graph:
            w = {n: t.detach().requires_grad_(True) for n, t in w.items()}
    return w
