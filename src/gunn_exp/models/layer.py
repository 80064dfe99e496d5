"""The GUNN layer (docs/SPEC.md §1): K channel segments updated one after another.

    for i in 1..K:
        z_i = cat(y_1, ..., y_{i-1}, x_i, ..., x_K)
        y_i = x_i + G_i(z_i)

`GunnUnit` is one G_i. `GunnLayer` owns the K units and delegates the update loop to an
*implementation* (see `IMPLEMENTATIONS`): every implementation computes the same function with the
same parameters, they differ only in speed and in what they keep for backward. `"reference"` is the
plain, obviously correct loop and is the oracle the tests compare every other one against.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

UPDATES = ("gradual", "simultaneous")
# GunnLayer's implementation unless told otherwise: the best measured trade-off (see
# docs/PERFORMANCE.md). Registered by gunn_exp.models.whole_layer, which the package imports.
DEFAULT_IMPL = "recompute"


class GunnUnit(nn.Module):
    """One update function G_i: C channels in, o = C/K channels out (docs/SPEC.md §1 bottleneck).

    The first 1x1 conv (C -> 2o) and the CIFAR projection branch (C -> o) read the same z_i, so
    they are stored as one C -> 2o(+o) conv `conv_in` with a per-channel BatchNorm `bn_in`: the
    same function and parameter count as the paper's two Conv-BN pairs, with one pass over z_i.
    Only the parameter layout differs (rows [0, 2o) are the bottleneck conv, rows [2o, 3o) the
    projection), which is why `reset_parameters` initialises each block of rows as its own conv.
    """

    def __init__(self, channels: int, width: int, projection: bool = True) -> None:
        super().__init__()
        hidden = 2 * width
        self.width = width
        self.hidden = hidden
        self.projection = projection
        fused = hidden + (width if projection else 0)
        self.conv_in = nn.Conv2d(channels, fused, 1, bias=False)
        self.bn_in = nn.BatchNorm2d(fused)
        self.conv_mid = nn.Conv2d(hidden, hidden, 3, padding=1, bias=False)
        self.bn_mid = nn.BatchNorm2d(hidden)
        self.conv_out = nn.Conv2d(hidden, width, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, zero_init_last: bool = False) -> None:
        """The authors' init (gunn-15.lua): every conv kaiming normal, fan_out, relu; BN (1, 0).

        Each conv fused into `conv_in` gets its own fan_out: std sqrt(2 / 2o) for the bottleneck
        rows and sqrt(2 / o) for the projection rows, not sqrt(2 / 3o) for the fused conv.
        `zero_init_last` (a deviation from the authors, as timm and torchvision do for residual
        branches) zeroes the gamma of the BatchNorms that end G_i (bn_out and the projection's
        channels of bn_in), so G_i starts at 0 and the layer at the identity.
        """
        rows = [self.hidden] + ([self.width] if self.projection else [])
        for block in self.conv_in.weight.split(rows):
            block.normal_(0.0, math.sqrt(2.0 / block.shape[0]))  # 1x1: fan_out = out channels
        for conv in (self.conv_mid, self.conv_out):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        for bn in (self.bn_in, self.bn_mid, self.bn_out):
            bn.reset_parameters()  # weight 1, bias 0, running statistics (0, 1)
        if zero_init_last:
            self.bn_out.weight.zero_()
            self.bn_in.weight[self.hidden :].zero_()

    def forward(self, z: Tensor) -> Tensor:
        return self.parts(z)[2]

    def parts(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(first hidden activation, second hidden activation, G_i(z)): the forward pass with
        the hidden ReLU outputs it passes through, which the singularity probe measures."""
        a = self.bn_in(self.conv_in(z))
        h1 = torch.relu(a[:, : self.hidden])
        h2 = torch.relu(self.bn_mid(self.conv_mid(h1)))
        h = self.bn_out(self.conv_out(h2))
        if self.projection:
            h = h + a[:, self.hidden :]
        return h1, h2, h


# An implementation maps (x, units, update, **options) -> output; `GunnLayer.impl_options` are
# the options (e.g. the whole-layer Functions' `compile`). Register new ones with `register_impl`.
GunnImpl = Callable[..., Tensor]
IMPLEMENTATIONS: dict[str, GunnImpl] = {}


def register_impl(name: str) -> Callable[[GunnImpl], GunnImpl]:
    def wrap(fn: GunnImpl) -> GunnImpl:
        IMPLEMENTATIONS[name] = fn
        return fn

    return wrap


@register_impl("reference")
def reference_update(x: Tensor, units: Sequence[GunnUnit], update: str) -> Tensor:
    """The sequential rule of docs/SPEC.md §1 written out literally; autograd keeps every z_i."""
    width = units[0].width
    if isinstance(x, torch.fx.Proxy):  # symbolic tracing cannot iterate over split's result
        xs = [x[:, i * width : (i + 1) * width] for i in range(len(units))]
    else:  # one split: its backward is one concatenation, where slices' would be K zero-fills
        xs = list(x.split(width, dim=1))
    if update == "simultaneous":  # the SUNN ablation: every G_i reads the original x
        return torch.cat([xi + unit(x) for xi, unit in zip(xs, units, strict=True)], dim=1)
    ys: list[Tensor] = []
    for i, unit in enumerate(units):
        z = torch.cat(ys + xs[i:], dim=1)
        ys.append(xs[i] + unit(z))
    return torch.cat(ys, dim=1)


class GunnLayer(nn.Module):
    """Gradually updated layer on `channels` channels split into `segments` equal segments.

    Args:
        channels: C, input and output channels.
        segments: K, number of segments; must divide C.
        projection: add the 1x1 Conv-BN projection of z_i to each G_i (CIFAR models) or not
            (ImageNet models).
        update: "gradual" (GUNN) or "simultaneous" (the SUNN ablation: every G_i reads x).
        impl: which implementation computes the update loop (a key of `IMPLEMENTATIONS`);
            `DEFAULT_IMPL` by default.
    """

    def __init__(
        self,
        channels: int,
        segments: int,
        projection: bool = True,
        update: str = "gradual",
        impl: str = DEFAULT_IMPL,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"GunnLayer: channels={channels} must be a positive number.")
        if segments < 1 or channels % segments:
            raise ValueError(
                f"GunnLayer: channels={channels} is not divisible by segments={segments}; "
                f"choose segments among the divisors of {channels} "
                f"(nearest: {divisors_near(channels, segments)})."
            )
        if update not in UPDATES:
            raise ValueError(f"GunnLayer: update={update!r} is not one of {UPDATES}.")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(
                f"GunnLayer: impl={impl!r} is unknown; choose one of {sorted(IMPLEMENTATIONS)}."
            )
        self.channels = channels
        self.segments = segments
        self.width = channels // segments
        self.update = update
        self.impl = impl
        # Keyword options of the implementation (`gunn_exp.models.compile` sets `compile`).
        self.impl_options: dict[str, Any] = {}
        self.units = nn.ModuleList(
            GunnUnit(channels, self.width, projection) for _ in range(segments)
        )

    def forward(self, x: Tensor) -> Tensor:
        # torch.jit.script compiles the sequential rule (is_scripting is a compile-time constant):
        # the fast implementations are autograd Functions, which TorchScript cannot compile.
        if torch.jit.is_scripting():
            return self._scripted_update(x)
        return self._update(x)

    @torch.jit.unused
    def _update(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):
            # torch.fx.symbolic_trace: record the sequential rule itself (the fast
            # implementations are autograd Functions, opaque to FX, that compute the same).
            return reference_update(x, self.units, self.update)
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"GunnLayer expects a (batch, {self.channels}, height, width) tensor, got shape "
                f"{tuple(x.shape)}."
            )
        return IMPLEMENTATIONS[self.impl](x, self.units, self.update, **self.impl_options)

    def _scripted_update(self, x: Tensor) -> Tensor:
        """`reference_update` in the subset of Python that TorchScript compiles."""
        xs = x.split(self.width, dim=1)
        ys: list[Tensor] = []
        for i, unit in enumerate(self.units):
            z = x if self.update == "simultaneous" else torch.cat(ys + xs[i:], dim=1)
            ys.append(xs[i] + unit(z))
        return torch.cat(ys, dim=1)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, segments={self.segments}, width={self.width}, "
            f"update={self.update}, impl={self.impl}"
            + "".join(f", {k}={v}" for k, v in self.impl_options.items())
        )


def divisors_near(n: int, k: int, count: int = 4) -> str:
    """The `count` divisors of `n` closest to `k`, ascending: the segment counts a user who asked
    for `k` segments of `n` channels most likely meant."""
    divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))
    return ", ".join(map(str, sorted(divisors[:count])))
