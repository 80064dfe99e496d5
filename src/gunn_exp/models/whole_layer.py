"""GUNN implementations `"recompute"`, `"keep_in"`, `"keep_convs"`: the layer as one Function.

Autograd would store every z_i of the update loop (docs/SPEC.md §1), K x C channels per layer, and
launch one node per operator of every G_i. Instead, forward runs without autograd in one buffer,
`buf[:, seg_i] += G_i(buf)` in place, and keeps x, the output y, every BatchNorm's batch statistics
(two numbers per channel) and, per segment, nothing (`recompute`), the first conv's output (3o
channels, `keep_in`) or all three conv outputs (6o, `keep_convs`). Backward walks i = K..1, turning
a copy of y back into z_i = cat(y_<i, x_>=i) one segment at a time, recomputes what was not kept
(BatchNorm with the *saved* statistics, so running statistics are not touched twice) and
backpropagates through G_i with the explicit backward functions of `gunn_exp.models.functional`,
accumulating dL/dz_i = dL/dz_{i+1} + J_i^T dL/dy_i in one buffer (J_i: Jacobian of G_i). Outputs,
gradients and BatchNorm buffers are `"reference"`'s up to rounding (tests/test_impls.py).

The simultaneous update (SUNN) works too; there every z_i is x itself. Under autocast G_i is
computed in the autocast dtype, like `"reference"`. Each BatchNorm keeps its own train/eval mode (a
frozen, eval-mode BatchNorm in a training model uses and keeps its running statistics); a training
BatchNorm with one value per channel raises PyTorch's error; `nn.SyncBatchNorm` across processes is
synchronised inside the Function, so `trainer.sync_batchnorm=true` keeps the fast path. Modules the
Function does not compute itself (FrozenBatchNorm2d, BatchNorm subclasses, untracked or non-affine
BatchNorm, conv subclasses) make the layer run `"reference"`'s path instead (see `_fusable`).

G_i's forward and backward are two segment functions (`_segment_forward`, `_segment_backward`),
run eagerly (`EAGER_OPS`) or under `torch.compile` (`compiled_ops`, what
`gunn_exp.models.compile.compile_regions` selects). Per-layer work is done once for all K units
where it can be (one foreach update of the batch counters, one foreach cast of the conv weights
under autocast, the BatchNorm recompute affines of all units in a few operators), since on a GPU
every launched operator costs microseconds; `gunn_exp.analysis.opcount` counts them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn_exp.models.functional import (
    affine_relu,
    bn_affine,
    bn_backward,
    bn_forward,
    bn_momenta,
    conv1x1,
    conv1x1_backward,
    is_channels_last,
    sync_group,
)
from gunn_exp.models.layer import GunnUnit, reference_update, register_impl

aten = torch.ops.aten

# What the whole-layer Function keeps per segment: "a" conv_in's output, "m" conv_mid's, "c"
# conv_out's. Whatever is not kept is recomputed in backward.
KEEP: dict[str, tuple[str, ...]] = {
    "recompute": (),
    "keep_in": ("a",),
    "keep_convs": ("a", "m", "c"),
}

# Per unit the Function takes 9 parameters (conv_in, conv_mid, conv_out weights, then weight and
# bias of bn_in, bn_mid, bn_out) followed by 6 buffers (running mean and var of the three BNs).
_PARAMS_PER_UNIT = 9
_TENSORS_PER_UNIT = 15
_STATS_PER_UNIT = 6  # (mean, invstd) of bn_in, bn_mid, bn_out


def _cast_all(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """`[t.to(dtype) for t in tensors]` as one foreach copy: one operator, not one per tensor."""
    if all(t.dtype == dtype for t in tensors):
        return list(tensors)
    out = [torch.empty_like(t, dtype=dtype) for t in tensors]
    torch._foreach_copy_(out, list(tensors))
    return out


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype G_i runs in: autocast's for float32 inputs when autocast is on, else x's."""
    device = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# The BatchNorm and conv classes whose forward the whole-layer Function computes itself. Any other
# module (FrozenBatchNorm2d keeps its affine map in buffers, a subclass may override forward) is
# computed exactly only by the module itself, so such layers run `reference`'s path instead.
_FUSABLE_BN = (nn.BatchNorm2d, nn.SyncBatchNorm)


def _fusable(units: Sequence[GunnUnit]) -> bool:
    """Whether the whole-layer Function computes these units exactly (see `_FUSABLE_BN`)."""
    for u in units:
        if any(type(conv) is not nn.Conv2d for conv in (u.conv_in, u.conv_mid, u.conv_out)):
            return False
        for bn in (u.bn_in, u.bn_mid, u.bn_out):
            if type(bn) not in _FUSABLE_BN or not (bn.affine and bn.track_running_stats):
                return False
    return True


class _Segment(NamedTuple):
    """The constants of one G_i's computation: everything but its tensors.

    They are the static arguments of the segment functions, so a compiled segment function is
    specialised on them (Dynamo guards on their values) and units that share them share code.
    """

    hidden: int
    projection: bool
    keep: tuple[str, ...]
    dtype: torch.dtype  # the compute dtype (autocast's, or the input's)
    training: tuple[bool, bool, bool]  # bn_in, bn_mid, bn_out, each in its own mode
    momenta: tuple[float, float, float]
    eps: tuple[float, float, float]


class _Spec:
    """Static description of one layer call, shared by forward and backward.

    Each BatchNorm keeps its own mode (a frozen, eval-mode BatchNorm inside a training model
    normalises with its running statistics and updates nothing, as in `reference`).
    """

    def __init__(
        self,
        units: Sequence[GunnUnit],
        gradual: bool,
        keep: tuple[str, ...],
        x: Tensor,
        ops: _SegmentOps,
    ) -> None:
        unit = units[0]
        bns = [bn for u in units for bn in (u.bn_in, u.bn_mid, u.bn_out)]
        self.width = unit.width
        self.gradual = gradual
        training = [bn.training for bn in bns]
        groups = [sync_group(bn) for bn in bns]
        n, _, h, w = x.shape
        local = [t and g is None for t, g in zip(training, groups, strict=True)]
        if n * h * w == 1 and any(local):
            size = torch.Size((n, unit.conv_in.out_channels, h, w))  # bn_in's input, as reference
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {size}"
            )
        momenta, eps, dtype = bn_momenta(bns), [bn.eps for bn in bns], _compute_dtype(x)
        self.segments = [
            _Segment(
                unit.hidden,
                unit.projection,
                keep,
                dtype,
                tuple(training[3 * i : 3 * i + 3]),
                tuple(momenta[3 * i : 3 * i + 3]),
                tuple(eps[3 * i : 3 * i + 3]),
            )
            for i in range(len(units))
        ]
        self.groups = [tuple(groups[3 * i : 3 * i + 3]) for i in range(len(units))]
        self.count: Tensor | None = None  # global batch count of synchronised BatchNorms
        # Collectives stay out of compiled code: a synchronised layer runs the eager functions.
        self.ops = EAGER_OPS if any(g is not None for g in groups) else ops


def _segment_forward(
    z: Tensor,
    convs: Sequence[Tensor],
    affine: Sequence[Tensor],
    running: Sequence[Tensor],
    seg: _Segment,
    groups: Sequence[Any],
) -> tuple[Tensor, list[Tensor], Tensor | None]:
    """G_i(z_i) without autograd: (output, what backward needs, global count of synced BNs).

    `convs` are the three conv weights in the compute dtype, `affine` the (weight, bias) of
    bn_in, bn_mid, bn_out, `running` their (mean, var); the running statistics are updated.
    What backward needs: each BatchNorm's (mean, invstd), then the conv outputs in `seg.keep`.
    """
    hid, (w_in, w_mid, w_out) = seg.hidden, convs
    a = conv1x1(z.to(seg.dtype), w_in)
    a_bn, mean_in, inv_in, count = bn_forward(
        a, *affine[0:2], running[0:2], seg.momenta[0], seg.eps[0], seg.training[0], groups[0]
    )
    m = F.conv2d(torch.relu_(a_bn[:, :hid]), w_mid, padding=1)
    m_bn, mean_mid, inv_mid, _ = bn_forward(
        m, *affine[2:4], running[2:4], seg.momenta[1], seg.eps[1], seg.training[1], groups[1]
    )
    c = conv1x1(torch.relu_(m_bn), w_out)
    c_bn, mean_out, inv_out, _ = bn_forward(
        c, *affine[4:6], running[4:6], seg.momenta[2], seg.eps[2], seg.training[2], groups[2]
    )
    if seg.projection:
        c_bn.add_(a_bn[:, hid:])
    kept = {"a": a, "m": m, "c": c}
    saved = [mean_in, inv_in, mean_mid, inv_mid, mean_out, inv_out]
    return c_bn, saved + [kept[name] for name in seg.keep], count


def _segment_backward(
    grad_out: Tensor,
    z: Tensor,
    convs: Sequence[Tensor],
    gammas: Sequence[Tensor],
    saved: Sequence[Tensor],
    recompute_affine: Sequence[Tensor],
    seg: _Segment,
    groups: Sequence[Any],
    count: Tensor | None,
    into: Tensor | None,
) -> tuple[Tensor, list[Tensor]]:
    """Backpropagate dL/dy_i through G_i: (J_i^T dL/dy_i, gradients of the unit's parameters).

    `gammas` are the BatchNorm weights, `saved` what `_segment_forward` returned for backward,
    `recompute_affine` the (scale, shift) of bn_in's first 2o channels and of bn_mid under the
    saved statistics. Conv outputs that were not kept are recomputed. With `into`, J_i^T dL/dy_i
    is accumulated into it in place and `into` is returned. Parameter gradients are in
    `_unit_tensors` order: the three conv weights, then (weight, bias) of bn_in, bn_mid, bn_out.
    """
    hid, (w_in, w_mid, w_out), (g_in, g_mid, g_out) = seg.hidden, convs, gammas
    mean_in, inv_in, mean_mid, inv_mid, mean_out, inv_out, *kept_list = saved
    kept = dict(zip(seg.keep, kept_list, strict=True))
    scale_in, shift_in, scale_mid, shift_mid = recompute_affine
    train, eps = seg.training, seg.eps
    grad_out, z = grad_out.to(seg.dtype), z.to(seg.dtype)
    # Recompute what was not kept; BatchNorm uses the saved statistics.
    a = kept["a"] if "a" in kept else conv1x1(z, w_in)
    h1 = affine_relu(a[:, :hid], scale_in, shift_in)
    m = kept["m"] if "m" in kept else F.conv2d(h1, w_mid, padding=1)
    h2 = affine_relu(m, scale_mid, shift_mid)
    c = kept["c"] if "c" in kept else conv1x1(h2, w_out)
    # Backpropagate through G_i, in reverse order of its forward.
    g_c, d_g_out, d_b_out = bn_backward(
        grad_out, c, g_out, mean_out, inv_out, eps[2], train[2], groups[2], count
    )
    d_w_out, g_h2 = conv1x1_backward(g_c, h2, w_out)
    g_m, d_g_mid, d_b_mid = bn_backward(
        aten.threshold_backward(g_h2, h2, 0),
        m,
        g_mid,
        mean_mid,
        inv_mid,
        eps[1],
        train[1],
        groups[1],
        count,
    )
    g_h1, d_w_mid, _ = aten.convolution_backward(
        g_m, h1, w_mid, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False]
    )
    # dL/d bn_in's output: relu backward on the first 2o channels, dL/dy_i on the projection's o
    # channels. A concatenation (two operators, as writing both into one buffer is) that
    # inductor fuses into the relu backward; writes into slices of a buffer it would copy.
    g_a_bn = aten.threshold_backward(g_h1, h1, 0)
    if seg.projection:
        g_a_bn = torch.cat([g_a_bn, grad_out], dim=1)
    g_a, d_g_in, d_b_in = bn_backward(
        g_a_bn, a, g_in, mean_in, inv_in, eps[0], train[0], groups[0], count
    )
    d_w_in, grad_z = conv1x1_backward(g_a, z, w_in, into=into)
    return grad_z, [d_w_in, d_w_mid, d_w_out, d_g_in, d_b_in, d_g_mid, d_b_mid, d_g_out, d_b_out]


class _SegmentOps(NamedTuple):
    """The pair of segment functions a layer call runs: eager, or compiled (`compiled_ops`)."""

    forward: Callable[..., tuple[Tensor, list[Tensor], Tensor | None]]
    backward: Callable[..., tuple[Tensor, list[Tensor]]]
    accumulates: bool  # backward adds J_i^T dL/dy_i into the running gradient in place


EAGER_OPS = _SegmentOps(_segment_forward, _segment_backward, accumulates=True)


@functools.cache
def compiled_ops(mode: str | None = None, backend: str = "inductor") -> _SegmentOps:
    """The segment functions under `torch.compile`: regional compilation of the whole layer.

    Dynamo caches compiled code per function and per guard set (shapes, dtypes, the `_Segment`
    constants), not per unit, so G_i's forward and backward are each compiled once per stage
    shape and mode and then reused by every unit and layer of that shape. The compiled backward
    returns J_i^T dL/dy_i instead of accumulating it in place (an input mutated through a view
    that another input aliases would be copied), and the layer adds it.
    """
    options = {"mode": mode, "backend": backend, "dynamic": False}
    return _SegmentOps(
        torch.compile(_segment_forward, **options),
        torch.compile(_segment_backward, **options),
        accumulates=False,
    )


def _conv_weights(flat: Sequence[Tensor], i: int, per: int = _TENSORS_PER_UNIT) -> list[Tensor]:
    """Unit i's three conv weights in a flat list of `per` tensors per unit."""
    return list(flat[i * per : i * per + 3])


def _unit_tensors(units: Sequence[GunnUnit]) -> list[Tensor]:
    """The Function's tensor inputs, `_TENSORS_PER_UNIT` per unit (see `_PARAMS_PER_UNIT`)."""
    flat: list[Tensor] = []
    for u in units:
        bns = (u.bn_in, u.bn_mid, u.bn_out)
        flat += [u.conv_in.weight, u.conv_mid.weight, u.conv_out.weight]
        flat += [t for bn in bns for t in (bn.weight, bn.bias)]
        flat += [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    return flat


class _GunnLayerFunction(torch.autograd.Function):
    """The whole GUNN layer as one autograd node (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, spec: _Spec, x: Tensor, *flat: Tensor) -> Tensor:
        o, k, dt = spec.width, len(spec.segments), spec.segments[0].dtype
        fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        buf = x.clone(memory_format=fmt)
        params: list[Tensor] = []
        saved: list[Tensor] = []
        convs = _cast_all([w for i in range(k) for w in _conv_weights(flat, i)], dt)
        with torch.autocast(x.device.type, enabled=False):
            for i in range(k):
                unit = flat[i * _TENSORS_PER_UNIT : (i + 1) * _TENSORS_PER_UNIT]
                g, saved_i, count = spec.ops.forward(
                    buf if spec.gradual else x,
                    convs[3 * i : 3 * i + 3],
                    unit[3:9],
                    unit[9:15],
                    spec.segments[i],
                    spec.groups[i],
                )
                buf[:, i * o : (i + 1) * o].add_(g)  # y_i = x_i + G_i(z_i), over x_i
                if count is not None:
                    spec.count = count
                params += unit[:_PARAMS_PER_UNIT]
                saved += saved_i
        ctx.spec, ctx.format = spec, fmt
        ctx.save_for_backward(x, buf, *params, *saved)
        return buf

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        o, k = spec.width, len(spec.segments)
        hid, dt = spec.segments[0].hidden, spec.segments[0].dtype
        x, y, *rest = ctx.saved_tensors
        params, saved = rest[: k * _PARAMS_PER_UNIT], rest[k * _PARAMS_PER_UNIT :]
        per_unit = _STATS_PER_UNIT + len(spec.segments[0].keep)
        grad_state = grad_y.clone(memory_format=ctx.format)  # dL/dz_{i+1} -> dL/dz_i -> dL/dx
        state = y.clone(memory_format=ctx.format) if spec.gradual else x  # z_{i+1} -> z_i
        grads: list[Tensor | None] = [None] * (k * _TENSORS_PER_UNIT)
        # Per-layer work done once for all units, not once per unit (fewer, larger operators):
        # the conv weights in the compute dtype, and the (scale, shift) with which bn_in's first
        # 2o channels and bn_mid are recomputed from the saved statistics.
        convs = _cast_all([w for i in range(k) for w in _conv_weights(params, i, per=9)], dt)

        def by_unit(
            items: Sequence[Tensor], per: int, a_in: int, a_mid: int, b_in: int, b_mid: int
        ):
            """(K, 2, 4o): per unit, quantities a and b of [bn_in's first 2o channels, bn_mid]."""
            parts = []
            for i in range(k):
                u = items[i * per : (i + 1) * per]
                parts += [u[a_in][:hid], u[a_mid], u[b_in][:hid], u[b_mid]]
            return torch.cat(parts).view(k, 2, 2 * hid)

        stats = by_unit(saved, per_unit, 0, 2, 1, 3)  # (mean, invstd)
        affine = by_unit(params, _PARAMS_PER_UNIT, 3, 5, 4, 6)  # (gamma, beta)
        scale, shift = bn_affine(stats[:, 0], stats[:, 1], affine[:, 0], affine[:, 1])
        for i in reversed(range(k)):
            p = params[i * _PARAMS_PER_UNIT : (i + 1) * _PARAMS_PER_UNIT]
            seg = slice(i * o, (i + 1) * o)
            if spec.gradual:
                state[:, seg].copy_(x[:, seg])  # z_i = cat(y_<i, x_>=i)
            # dL/dy_i. Gradual: segment i of dL/dz_{i+1} (later units read y_i); a view, read
            # before J_i^T dL/dy_i is added to grad_state. Simultaneous: only the output reads y_i.
            grad_z, grads_i = spec.ops.backward(
                (grad_state if spec.gradual else grad_y)[:, seg],
                state,
                convs[3 * i : 3 * i + 3],
                (p[3], p[5], p[7]),
                saved[i * per_unit : (i + 1) * per_unit],
                (scale[i, :hid], shift[i, :hid], scale[i, hid:], shift[i, hid:]),
                spec.segments[i],
                spec.groups[i],
                spec.count,
                grad_state if spec.ops.accumulates else None,
            )
            if not spec.ops.accumulates:
                grad_state.add_(grad_z)  # dL/dz_i = dL/dz_{i+1} + J_i^T dL/dy_i
            base = i * _TENSORS_PER_UNIT  # gradients in `_unit_tensors` order; none for buffers
            grads[base : base + _PARAMS_PER_UNIT] = grads_i
        return (None, grad_state, *grads)


def _whole_layer_impl(keep: tuple[str, ...]):
    def update(
        x: Tensor, units: Sequence[GunnUnit], update: str, compile: dict[str, Any] | None = None
    ) -> Tensor:
        if not _fusable(units):
            return reference_update(x, units, update)
        ops = EAGER_OPS if compile is None else compiled_ops(**compile)
        spec = _Spec(units, update == "gradual", keep, x, ops)
        return _GunnLayerFunction.apply(spec, x, *_unit_tensors(units))

    update.__doc__ = (
        f"Whole-layer Function keeping {keep or 'no'} conv outputs per segment "
        "(`reference`'s path for BatchNorm or conv modules it does not fuse, see `_fusable`); "
        "`compile`: torch.compile options for its segment functions (`compiled_ops`)."
    )
    return update


for _name, _keep in KEEP.items():
    register_impl(_name)(_whole_layer_impl(_keep))
