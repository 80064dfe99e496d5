"""The GUNN layer computes docs/SPEC.md §1's rule, for every registered implementation.

The oracle is written here, independently of layer.py: it keeps one C-channel state tensor and
overwrites segment i with x_i + G_i(state) (G_i(x) for the simultaneous update), calling
`layer.units[i]` directly. Outputs, input and parameter gradients and BatchNorm running statistics
must agree in float64, in train and in eval mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from gunn_exp.models import IMPLEMENTATIONS, GunnLayer

SHAPES = [(4, 1), (4, 4), (6, 2), (6, 3), (8, 2)]  # (C, K): K=1, K=C (width 1) and in between


def literal_rule(layer: GunnLayer, x: Tensor) -> Tensor:
    """docs/SPEC.md §1: y_i = x_i + G_i(cat(y_<i, x_>=i)), i = 1..K (G_i(x) if simultaneous)."""
    o = layer.width
    state = x
    for i, unit in enumerate(layer.units):
        source = state if layer.update == "gradual" else x
        y_i = x[:, i * o : (i + 1) * o] + unit(source)
        state = torch.cat([state[:, : i * o], y_i, state[:, (i + 1) * o :]], dim=1)
    return state


def randomised_layer(channels: int, segments: int, update: str, impl: str) -> GunnLayer:
    """A float64 layer whose BatchNorms have non-trivial affine parameters and running stats."""
    layer = GunnLayer(channels, segments, projection=True, update=update, impl=impl).double()
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return layer


def run(layer: GunnLayer, fn, x: Tensor, grad_out: Tensor) -> tuple[Tensor, ...]:
    """Output, input gradient, parameter gradients and BN buffers after one forward/backward."""
    x = x.clone().requires_grad_(True)
    out = fn(layer, x)
    out.backward(grad_out)
    grads = tuple(p.grad for p in layer.parameters())
    return (out.detach(), x.grad, *grads, *layer.buffers())


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("update", ["gradual", "simultaneous"])
@pytest.mark.parametrize(("channels", "segments"), SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_literal_rule(
    impl: str, update: str, channels: int, segments: int, training: bool
) -> None:
    torch.manual_seed(channels * 10 + segments)
    layer = randomised_layer(channels, segments, update, impl).train(training)
    oracle = copy.deepcopy(layer)
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)

    ours = run(layer, lambda m, t: m(t), x, grad_out)
    expected = run(oracle, literal_rule, x, grad_out)

    assert len(ours) == len(expected)
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_gradual_differs_from_simultaneous(impl: str) -> None:
    """Guards the oracle itself: with K > 1 the two update rules must not coincide."""
    torch.manual_seed(0)
    gradual = randomised_layer(6, 3, "gradual", impl).eval()
    simultaneous = copy.deepcopy(gradual)
    simultaneous.update = "simultaneous"
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    assert not torch.allclose(gradual(x), simultaneous(x))


@pytest.mark.parametrize(("channels", "segments"), [(10, 3), (6, 4), (5, 0), (7, 14)])
def test_bad_segments_raise_naming_values(channels: int, segments: int) -> None:
    with pytest.raises(ValueError) as err:
        GunnLayer(channels, segments)
    assert f"channels={channels}" in str(err.value)
    assert f"segments={segments}" in str(err.value)


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match="expects 6 channels, got 4"):
        GunnLayer(6, 3)(torch.randn(1, 4, 2, 2))
