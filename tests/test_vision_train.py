"""flwr_ext.vision.train_local: SCAFFOLD's grad_offset."""

from __future__ import annotations

import torch
from torch import nn

from flwr_ext.vision.train import train_local


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)


def test_grad_offset_is_added_to_every_step_by_hand() -> None:
    x, y = _data()
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ref = nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    offset = {"weight": torch.full((2, 3), 0.5), "bias": torch.tensor([1.0, -1.0])}
    train_local(model, x, y, steps=1, batch_size=8, lr=0.1, grad_offset=offset)
    nn.CrossEntropyLoss()(ref(x), y).backward()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            expected = p - 0.1 * (p.grad + offset[name])
            torch.testing.assert_close(dict(model.named_parameters())[name], expected)


def test_grad_offset_skips_frozen_parameters() -> None:
    """A frozen parameter has no gradient: its offset is ignored (it raised AttributeError)."""
    x, y = _data()
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    offset = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    train_local(model, x, y, steps=2, batch_size=4, lr=0.1, grad_offset=offset)
    torch.testing.assert_close(model[0].weight, frozen)
