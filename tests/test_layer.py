"""The GUNN layer computes docs/SPEC.md §1's rule, for every registered implementation.

The oracle is written here, independently of layer.py: each G_i is built from separate
nn.Conv2d / nn.BatchNorm2d / nn.ReLU modules as SPEC §1 lists them (the bottleneck F_i, plus the
projection BN(Conv1x1 C->o(z)) on CIFAR), holding the layer's weights copied out of its fused
`conv_in`/`bn_in` row blocks (rows [0, 2o) the bottleneck's first conv, [2o, 3o) the projection).
The update loop keeps one C-channel state tensor and overwrites segment i with x_i + G_i(state)
(G_i(x) for the simultaneous update). Outputs, input and parameter gradients and BatchNorm
running statistics must agree in float64, in train and in eval mode, with and without the
projection; so a misreading of the unit (where the ReLUs go, where the projection adds, how the
fused conv's rows split) fails here even if every implementation shares it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable

import pytest
import torch
from torch import Tensor, nn

from gunn_exp.models import IMPLEMENTATIONS, GunnLayer

SHAPES = [(4, 1), (4, 4), (6, 2), (6, 3), (8, 2)]  # (C, K): K=1, K=C (width 1) and in between


class SpecUnit(nn.Module):
    """G_i as docs/SPEC.md §1 writes it, one module per operator (o = C / K):

    F_i(z) = BN(Conv1x1 2o->o(ReLU(BN(Conv3x3 2o->2o(ReLU(BN(Conv1x1 C->2o(z))))))))
    G_i(z) = F_i(z) + BN(Conv1x1 C->o(z)) with the projection, else F_i(z)
    """

    def __init__(self, channels: int, width: int, projection: bool) -> None:
        super().__init__()
        o = width
        self.f = nn.Sequential(
            nn.Conv2d(channels, 2 * o, 1, bias=False),
            nn.BatchNorm2d(2 * o),
            nn.ReLU(),
            nn.Conv2d(2 * o, 2 * o, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * o),
            nn.ReLU(),
            nn.Conv2d(2 * o, o, 1, bias=False),
            nn.BatchNorm2d(o),
        )
        self.proj = None
        if projection:
            self.proj = nn.Sequential(nn.Conv2d(channels, o, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, z: Tensor) -> Tensor:
        return self.f(z) if self.proj is None else self.f(z) + self.proj(z)


# The SpecUnit modules whose tensors each GunnUnit module stacks along its output channels: the
# fused first conv (and its BN) holds the bottleneck's rows, then the projection's.
FUSED_FROM = {
    "conv_in": ("f.0", "proj.0"),
    "bn_in": ("f.1", "proj.1"),
    "conv_mid": ("f.3",),
    "bn_mid": ("f.4",),
    "conv_out": ("f.6",),
    "bn_out": ("f.7",),
}


def tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name."""
    return dict(itertools.chain(module.named_parameters(), module.named_buffers()))


def parts(unit: SpecUnit, name: str) -> list[Tensor]:
    """The SpecUnit tensors that GunnUnit's tensor `name` (e.g. `bn_in.running_var`) stacks."""
    module, attr = name.split(".")
    paths = FUSED_FROM[module] if unit.proj is not None else FUSED_FROM[module][:1]
    return [getattr(unit.get_submodule(p), attr) for p in paths]


def spec_units(layer: GunnLayer, projection: bool) -> list[SpecUnit]:
    """The layer's G_i as SpecUnits (with the projection or not: the test's, not the layer's
    say), holding copies of its weights and BatchNorm state."""
    units = []
    for unit in layer.units:
        spec = SpecUnit(layer.channels, layer.width, projection).double()
        spec.train(layer.training)
        with torch.no_grad():
            for name, fused in tensors(unit).items():
                blocks = parts(spec, name)
                if fused.ndim == 0:  # num_batches_tracked: every BN of the block counts it
                    for block in blocks:
                        block.copy_(fused)
                    continue
                for block, rows in zip(
                    blocks, fused.split([b.shape[0] for b in blocks]), strict=True
                ):
                    block.copy_(rows)
        units.append(spec)
    return units


def stacked(units: list[SpecUnit], keys: Iterable[str], read: Callable) -> dict[str, Tensor]:
    """For each GunnLayer tensor name in `keys` (`units.<i>.<module>.<attr>`), `read` of the
    SpecUnit tensors it stacks, stacked as the layer stacks them."""
    out = {}
    for key in keys:
        _, i, name = key.split(".", 2)
        values = [read(t) for t in parts(units[int(i)], name)]
        if values[0].ndim == 0:  # num_batches_tracked: every BN of the block counted alike
            assert all(torch.equal(v, values[0]) for v in values), key
            out[key] = values[0]
        else:
            out[key] = torch.cat(values)
    return out


def literal_rule(units: list[SpecUnit], update: str, x: Tensor) -> Tensor:
    """docs/SPEC.md §1: y_i = x_i + G_i(cat(y_<i, x_>=i)), i = 1..K (G_i(x) if simultaneous)."""
    o = x.shape[1] // len(units)
    state = x
    for i, unit in enumerate(units):
        source = state if update == "gradual" else x
        y_i = x[:, i * o : (i + 1) * o] + unit(source)
        state = torch.cat([state[:, : i * o], y_i, state[:, (i + 1) * o :]], dim=1)
    return state


def randomised_layer(
    channels: int, segments: int, update: str, impl: str, projection: bool = True
) -> GunnLayer:
    """A float64 layer whose BatchNorms have non-trivial affine parameters and running stats."""
    layer = GunnLayer(channels, segments, projection, update=update, impl=impl).double()
    with torch.no_grad():
        for module in layer.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return layer


def run(forward: Callable[[Tensor], Tensor], x: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """Output and input gradient of one forward/backward."""
    x = x.clone().requires_grad_(True)
    out = forward(x)
    out.backward(grad_out)
    return out.detach(), x.grad


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("update", ["gradual", "simultaneous"])
@pytest.mark.parametrize("projection", [True, False], ids=["projection", "no_projection"])
@pytest.mark.parametrize(("channels", "segments"), SHAPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_spec_modules(
    impl: str, update: str, projection: bool, channels: int, segments: int, training: bool
) -> None:
    torch.manual_seed(channels * 10 + segments)
    layer = randomised_layer(channels, segments, update, impl, projection).train(training)
    oracle = spec_units(layer, projection)
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)

    ours = run(layer, x, grad_out)
    expected = run(lambda t: literal_rule(oracle, update, t), x, grad_out)
    close = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(ours, expected, **close)
    grads = {n: p.grad for n, p in layer.named_parameters()}
    torch.testing.assert_close(grads, stacked(oracle, grads, lambda t: t.grad), **close)
    buffers = dict(layer.named_buffers())  # running statistics, updated in train mode
    torch.testing.assert_close(buffers, stacked(oracle, buffers, lambda t: t.detach()), **close)


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


def test_channels_below_one_raise() -> None:
    with pytest.raises(ValueError, match="channels=0 must be a positive number"):
        GunnLayer(0, 1)


def test_wrong_input_channels_raise() -> None:
    with pytest.raises(ValueError, match=r"expects a \(batch, 6, height, width\) .*\(1, 4, 2, 2\)"):
        GunnLayer(6, 3)(torch.randn(1, 4, 2, 2))
    # Unbatched (C, H, W), which a Conv2d would take: its first dim is not the channel count.
    with pytest.raises(ValueError, match=r"got shape \(6, 4, 4\)"):
        GunnLayer(6, 3)(torch.randn(6, 4, 4))
