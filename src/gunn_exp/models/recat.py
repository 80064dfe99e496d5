"""The `"recat"` GUNN implementation: the authors' re-concatenation trick, through autograd.

Stored naively, autograd keeps every z_i = cat(y_<i, x_>=i) of the update loop (docs/SPEC.md §1),
about K x C channels of activations per layer. The authors' code keeps one buffer and rebuilds z_i
in backward. Here "concat + first conv" is checkpointed (`torch.utils.checkpoint`), which keeps
references to x and to the y_j that exist anyway and re-concatenates z_i in backward, so the K
concatenated z_i are never stored; the rest of G_i runs through autograd with the unit's own
modules. (Measured against a former hand-written Function: bit-identical outputs, gradients and
BatchNorm buffers, the same saved bytes, within 2% of its step time at batch 16.)

The simultaneous update (SUNN) concatenates nothing: every z_i is x, and each unit runs as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from gunn_exp.models.layer import GunnUnit, register_impl


def _concat_conv1x1(weight: Tensor, *pieces: Tensor) -> Tensor:
    """conv1x1(cat(pieces), weight): what "recat" checkpoints (no randomness to preserve)."""
    return F.conv2d(torch.cat(pieces, dim=1), weight)


def _unit_after_conv_in(unit: GunnUnit, a: Tensor) -> Tensor:
    """`GunnUnit.forward` from the first conv's output on (same modules, same ops, same order)."""
    a = unit.bn_in(a)
    h = torch.relu(a[:, : unit.hidden])
    h = torch.relu(unit.bn_mid(unit.conv_mid(h)))
    h = unit.bn_out(unit.conv_out(h))
    return h + a[:, unit.hidden :] if unit.projection else h


@register_impl("recat")
def recat_update(x: Tensor, units: Sequence[GunnUnit], update: str) -> Tensor:
    """The sequential rule with z_i re-concatenated in backward instead of stored."""
    xs = list(x.split(units[0].width, dim=1))
    if update == "simultaneous":  # every z_i is x: nothing is concatenated
        return torch.cat([xi + unit(x) for xi, unit in zip(xs, units, strict=True)], dim=1)
    ys: list[Tensor] = []
    for i, unit in enumerate(units):
        a = checkpoint(
            _concat_conv1x1,
            unit.conv_in.weight,
            *ys,
            *xs[i:],
            use_reentrant=False,
            preserve_rng_state=False,
        )
        ys.append(xs[i] + _unit_after_conv_in(unit, a))
    return torch.cat(ys, dim=1)
