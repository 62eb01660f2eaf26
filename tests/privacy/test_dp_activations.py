"""replace_activations swaps ReLU for tanh in place without touching the parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flwr_ext.privacy import replace_activations
from flwr_ext.vision.model import DigitsCNN


def test_tanh_model_computes_tanh_and_keeps_its_state_dict():
    torch.manual_seed(0)
    model = DigitsCNN(width=16, hidden=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert replace_activations(model, "tanh") == 3
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert model.state_dict().keys() == before.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    # the forward pass is the same network with tanh in place of ReLU, written out by hand
    x = torch.rand(5, 1, 8, 8)
    f, c = model.features, model.classifier
    h = (x - 0.30) / 0.38
    h = nn.functional.max_pool2d(torch.tanh(f[0](h)), 2)
    h = nn.functional.adaptive_max_pool2d(torch.tanh(f[3](h)), 4)
    expected = c[3](torch.tanh(c[1](h.flatten(1))))
    torch.testing.assert_close(model(x), expected)


def test_relu_is_a_no_op_and_unknown_names_are_refused():
    model = DigitsCNN()
    assert replace_activations(model, "relu") == 0
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3
    with pytest.raises(ValueError, match="activation must be one of"):
        replace_activations(model, "gelu")
