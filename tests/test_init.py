"""Initialisation: the authors' per-conv kaiming init of the fused conv, and `zero_init_last`."""

from __future__ import annotations

import math

import pytest
import torch

from gunn_exp.models import GunnLayer, GunnUnit, create_model

# Registered GUNNs with an input that keeps every BatchNorm above one value per channel.
PAPER_MODELS = {
    "gunn15": (3, 32),
    "gunn24": (3, 32),
    "gunn18": (3, 64),
    "wide_gunn18": (3, 64),
    "gunn_mini": (3, 16),
}


def _std_close(weights: list[torch.Tensor], expected: float) -> None:
    std = torch.cat([w.flatten() for w in weights]).std().item()
    assert std == pytest.approx(expected, rel=0.04), (std, expected)


def test_fused_conv_blocks_have_their_own_fan_out() -> None:
    """gunn-15.lua: std sqrt(2/2o) for the bottleneck rows, sqrt(2/o) for the projection rows."""
    torch.manual_seed(0)
    model = create_model("gunn15")
    for layer in model.gunn_layers():
        units = list(layer.units)
        o = layer.width
        _std_close([u.conv_in.weight[: 2 * o] for u in units], math.sqrt(2 / (2 * o)))
        _std_close([u.conv_in.weight[2 * o :] for u in units], math.sqrt(2 / o))
        _std_close([u.conv_mid.weight for u in units], math.sqrt(2 / (2 * o * 9)))
        _std_close([u.conv_out.weight for u in units], math.sqrt(2 / o))


def test_unit_without_projection_and_standalone_layer_get_the_same_init() -> None:
    torch.manual_seed(0)
    layer = GunnLayer(400, 10, projection=False)
    unit: GunnUnit = layer.units[0]
    assert unit.conv_in.out_channels == 2 * layer.width
    _std_close([u.conv_in.weight for u in layer.units], math.sqrt(2 / (2 * layer.width)))
    assert all((u.bn_in.weight == 1).all() and (u.bn_out.weight == 1).all() for u in layer.units)


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_fresh_model_finite_in_train_mode(name: str) -> None:
    torch.manual_seed(0)
    chans, size = PAPER_MODELS[name]
    model = create_model(name).train()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, chans, size, size))).all()


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_zero_init_last_starts_every_layer_at_identity_and_is_finite_in_eval(name: str) -> None:
    torch.manual_seed(0)
    chans, size = PAPER_MODELS[name]
    model = create_model(name, zero_init_last=True).eval()
    x = torch.randn(2, chans, size, size)
    with torch.no_grad():
        logits = model(x)
        layer = next(model.gunn_layers())
        t = torch.randn(2, layer.channels, 4, 4)
        torch.testing.assert_close(layer(t), t)  # every G_i is 0: y = x
    assert torch.isfinite(logits).all()
    assert logits.abs().max() < 1e3


def test_zero_init_last_is_off_by_default() -> None:
    """The authors' init (every gamma 1) stays the default."""
    unit = next(create_model("gunn_mini").gunn_layers()).units[0]
    assert (unit.bn_out.weight == 1).all() and (unit.bn_in.weight == 1).all()
