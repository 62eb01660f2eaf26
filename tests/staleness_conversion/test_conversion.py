"""Stale-update conversion: the unrolled recipe, the conversion, the refusals, the baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flwr_ext.staleness_conversion import (
    ConversionRefused,
    InversionConfig,
    LocalRecipe,
    check_model,
    check_privacy,
    convert_update,
    dc_asgd,
    exp2_weight,
    unroll,
)
from flwr_ext.vision import DigitsCNN

D, C = 8, 3


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))


def _data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.randn(C, D, generator=g)
    y = torch.arange(n) % C
    return centers[y] + 0.5 * torch.randn(n, D, generator=g), y


def _flat(d: dict) -> np.ndarray:
    return np.concatenate([np.asarray(d[k], dtype=np.float64).ravel() for k in sorted(d)])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unrolled_recipe_matches_torch_sgd(momentum: float) -> None:
    x, y = _data(30)
    recipe = LocalRecipe(steps=7, lr=0.1, batch_size=8, momentum=momentum)
    model = _mlp()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = unroll(model, start, x, torch.eye(C)[y], recipe, create_graph=True)

    ref = _mlp()  # the client's real training: torch's SGD on batches 0,1,2,0,1,2,0 of 8
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=momentum)
    for i in range(7):
        b = i % (30 // 8)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x[b * 8 : (b + 1) * 8]), y[b * 8 : (b + 1) * 8]).backward()
        opt.step()
    for name, p in ref.named_parameters():
        assert torch.allclose(out[name], p, atol=1e-5, rtol=0), name
        assert not torch.equal(p, start[name])  # it did train
    assert out["0.weight"].requires_grad  # differentiable (create_graph)


def test_conversion_recovers_fresh_update_better_than_stale() -> None:
    x, y = _data()
    recipe = LocalRecipe(steps=4, lr=0.1)
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    current = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}

    def client(p):  # the true client's update from p
        out = unroll(model, p, x, torch.eye(C)[y], recipe, create_graph=False)
        return {k: (out[k] - p[k]).detach().numpy() for k in p}

    stale, fresh = client(base), client(current)
    conv = convert_update(
        _mlp,
        recipe,
        {k: v.numpy() for k, v in base.items()},
        stale,
        {k: v.numpy() for k, v in current.items()},
        input_shape=(D,),
        num_classes=C,
        config=InversionConfig(num_samples=32, iterations=200, input_low=None, input_high=None),
    )
    f = _flat(fresh)

    def cos(d):
        v = _flat(d)
        return float(v @ f / np.linalg.norm(v) / np.linalg.norm(f))

    def err(d):
        return float(np.linalg.norm(_flat(d) - f) / np.linalg.norm(f))

    # measured: stale cos 0.28 / relative error 1.07; converted cos 0.93 / error 0.37,
    # residual 0.050
    assert cos(stale) < 0.35 and err(stale) > 1.0
    assert cos(conv.delta) > 0.85 and err(conv.delta) < 0.5
    assert conv.residual < 0.15 and conv.accepted
    assert conv.seconds > 0
    assert set(conv.delta) == set(stale)
    assert conv.reconstruction.target.shape == (32, C)
    assert torch.allclose(conv.reconstruction.target.sum(1), torch.ones(32))


def test_poor_inversion_is_not_accepted() -> None:
    x, y = _data()
    recipe = LocalRecipe(steps=4, lr=0.1)
    model = _mlp()
    base = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    rng = np.random.default_rng(0)  # an update no local training produces: random noise
    delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
    conv = convert_update(
        _mlp,
        recipe,
        base,
        delta,
        base,
        input_shape=(D,),
        num_classes=C,
        config=InversionConfig(num_samples=8, iterations=20, input_low=None, input_high=None),
        max_residual=0.5,
    )
    assert conv.residual > 0.9 and not conv.accepted


@pytest.mark.parametrize(
    ("layer", "kind"), [(nn.BatchNorm1d(16), "BatchNorm1d"), (nn.Dropout(0.1), "Dropout")]
)
def test_batchnorm_and_dropout_are_refused(layer: nn.Module, kind: str) -> None:
    model = nn.Sequential(nn.Linear(D, 16), layer, nn.Linear(16, C))
    with pytest.raises(ConversionRefused, match=rf"module '1' \({kind}\)"):
        check_model(model)
    params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    with pytest.raises(ConversionRefused, match=kind):
        convert_update(
            lambda: model,
            LocalRecipe(steps=1, lr=0.1),
            params,
            params,
            params,
            input_shape=(D,),
            num_classes=C,
        )


def test_async_vision_model_is_accepted() -> None:
    check_model(DigitsCNN())  # no BatchNorm / dropout: the conversion may run on it


def test_dp_and_secure_aggregation_are_refused() -> None:
    check_privacy()
    with pytest.raises(ConversionRefused, match="differential privacy"):
        check_privacy(dp=True)
    with pytest.raises(ConversionRefused, match="secure aggregation"):
        check_privacy(secure_aggregation=True)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0, "lr": 0.1},
        {"steps": 1, "lr": 0.0},
        {"steps": 1, "lr": 0.1, "momentum": 1.0},
        {"steps": 1, "lr": 0.1, "batch_size": -1},
        {"steps": 1, "lr": 0.1, "loss": "mse"},
    ],
)
def test_recipe_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="LocalRecipe"):
        LocalRecipe(**kwargs)


def test_dc_asgd_and_exp2_by_hand() -> None:
    delta = {"w": np.array([1.0, -2.0], dtype=np.float32)}
    cur = {"w": np.array([0.5, 1.0], dtype=np.float32)}
    old = {"w": np.array([0.0, 0.0], dtype=np.float32)}
    out = dc_asgd(delta, cur, old, lam=0.5)
    # 1 - 0.5*1*1*0.5 = 0.75 ; -2 - 0.5*4*1 = -4
    np.testing.assert_allclose(out["w"], [0.75, -4.0])
    assert out["w"].dtype == np.float32
    assert exp2_weight(0) == 1.0 and exp2_weight(20) == 0.5 and exp2_weight(40) == 0.25
    with pytest.raises(ValueError):
        exp2_weight(-1)
