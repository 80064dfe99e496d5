"""Memory-light implementations of the GUNN update loop (issue 4), registered in `IMPLEMENTATIONS`.

All of them compute exactly the sequential rule of SPEC §1 with the parameters of the layer's
`GunnUnit`s, and update every BatchNorm's running statistics once per forward, as `"reference"`
does. They differ only in what they keep for backward and what they recompute:

`"recat"`
    The authors' trick: "concat + first conv" is one autograd Function that keeps references to
    x and the already existing y_j and re-concatenates z_i in backward, so the K concatenated z_i
    (K x C channels per layer) are never stored. The rest of G_i runs through autograd.
`"keep_convs"`, `"keep_in"`, `"recompute"`
    One autograd Function for the whole layer. Forward runs under no_grad in one buffer,
    `buf[:, seg_i] += G_i(buf)` in place, and keeps x, the output y, each BatchNorm's batch
    statistics (a few numbers per channel) and, per segment, the outputs of all three convs
    (6o channels, `keep_convs`), of the first conv only (3o, `keep_in`) or nothing (`recompute`).
    Backward walks i = K..1, turning a copy of y back into z_i one segment at a time, recomputes
    what was not kept (BatchNorm with the *saved* statistics, so the running statistics are not
    touched again) and backpropagates through G_i with explicit ATen backward ops, accumulating
    dL/dz_i in one buffer (dL/dz_i = dL/dz_{i+1} + J_i^T dL/dy_i, J_i the Jacobian of G_i).

The simultaneous update (SUNN) is handled by every implementation; there every z_i is x itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn_exp.models.layer import GunnUnit, register_impl

aten = torch.ops.aten

# What the whole-layer Function keeps per segment: conv_in output a, conv_mid output m, conv_out
# output c. Anything not kept is recomputed in backward.
KEEP = {"keep_convs": ("a", "m", "c"), "keep_in": ("a",), "recompute": ()}

# Per unit the Function takes 9 parameters (conv_in, conv_mid, conv_out weights, then weight and
# bias of bn_in, bn_mid, bn_out) followed by 6 buffers (running mean and var of the three BNs).
_PARAMS_PER_UNIT = 9
_TENSORS_PER_UNIT = 15


def _momentum(bn: nn.BatchNorm2d) -> float:
    """Count the batch and return the running-average factor, as `_BatchNorm.forward` does."""
    if not (bn.training and bn.track_running_stats):
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative moving average
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


def _check_units(units: Sequence[GunnUnit]) -> None:
    for unit in units:
        for bn in (unit.bn_in, unit.bn_mid, unit.bn_out):
            if not (bn.affine and bn.track_running_stats):
                raise ValueError("GUNN fast implementations need affine, tracked BatchNorm.")


# --------------------------------------------------------------------------------------------
# "recat": the authors' re-concatenation trick, everything else through autograd.


class _ConcatConv1x1(torch.autograd.Function):
    """conv1x1(cat(pieces), weight) that keeps the pieces, not their concatenation."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, *pieces: Tensor) -> Tensor:
        ctx.save_for_backward(weight, *pieces)
        return F.conv2d(torch.cat(pieces, dim=1), weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        weight, *pieces = ctx.saved_tensors
        z = torch.cat(pieces, dim=1)  # rebuilt here; it was freed after forward
        grad_z, grad_w, _ = aten.convolution_backward(
            grad, z, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [any(ctx.needs_input_grad[1:]), ctx.needs_input_grad[0], False],
        )
        grads = grad_z.split([p.shape[1] for p in pieces], dim=1) if grad_z is not None else None
        return (grad_w, *(grads if grads is not None else [None] * len(pieces)))


def _unit_after_conv_in(unit: GunnUnit, a: Tensor) -> Tensor:
    """GunnUnit.forward from the first conv's output on (same modules, same order of ops)."""
    a = unit.bn_in(a)
    h = torch.relu(a[:, : unit.hidden])
    h = torch.relu(unit.bn_mid(unit.conv_mid(h)))
    h = unit.bn_out(unit.conv_out(h))
    return h + a[:, unit.hidden :] if unit.projection else h


@register_impl("recat")
def recat_update(x: Tensor, units: Sequence[GunnUnit], update: str) -> Tensor:
    """Sequential rule with z_i re-concatenated in backward instead of kept (the authors' trick)."""
    xs = list(x.split(units[0].width, dim=1))
    if update == "simultaneous":  # z_i = x for all i: nothing is concatenated
        return torch.cat([xi + unit(x) for xi, unit in zip(xs, units, strict=True)], dim=1)
    ys: list[Tensor] = []
    for i, unit in enumerate(units):
        a = _ConcatConv1x1.apply(unit.conv_in.weight, *ys, *xs[i:])
        ys.append(xs[i] + _unit_after_conv_in(unit, a))
    return torch.cat(ys, dim=1)


# --------------------------------------------------------------------------------------------
# Whole-layer Function: in-place forward, recompute-what-was-not-kept backward.


def _affine(t: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """BatchNorm with given statistics: (t - mean) * invstd * weight + bias, per channel."""
    scale = invstd * weight
    shift = bias - mean * scale
    return torch.addcmul(shift[:, None, None], t, scale[:, None, None])


class _Spec:
    """Static description of one layer call (hashable, so torch.compile can specialise on it)."""

    __slots__ = ("segments", "width", "hidden", "projection", "gradual", "keep", "training",
                 "momenta", "eps")

    def __init__(self, units: Sequence[GunnUnit], gradual: bool, keep: tuple[str, ...]) -> None:
        unit = units[0]
        self.segments = len(units)
        self.width = unit.width
        self.hidden = unit.hidden
        self.projection = unit.projection
        self.gradual = gradual
        self.keep = keep
        self.training = unit.training
        self.momenta = tuple(_momentum(bn) for u in units for bn in (u.bn_in, u.bn_mid, u.bn_out))
        self.eps = tuple(bn.eps for u in units for bn in (u.bn_in, u.bn_mid, u.bn_out))


def _unit_tensors(units: Sequence[GunnUnit]) -> list[Tensor]:
    flat: list[Tensor] = []
    for u in units:
        bns = (u.bn_in, u.bn_mid, u.bn_out)
        flat += [u.conv_in.weight, u.conv_mid.weight, u.conv_out.weight]
        flat += [t for bn in bns for t in (bn.weight, bn.bias)]
        flat += [t for bn in bns for t in (bn.running_mean, bn.running_var)]
    return flat


def _bn_forward(t: Tensor, weight: Tensor, bias: Tensor, running: Sequence[Tensor],
                momentum: float, eps: float, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """BatchNorm forward; returns (output, mean, invstd) and updates running stats in training.

    In eval the statistics returned are the running ones (mean, 1/sqrt(var + eps)), so backward
    has one code path.
    """
    running_mean, running_var = running
    out, mean, invstd = aten.native_batch_norm(
        t, weight, bias, running_mean, running_var, training, momentum, eps
    )
    if not training:
        mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
    return out, mean, invstd


def _bn_backward(grad: Tensor, t: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                 eps: float, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of BatchNorm w.r.t. (input, weight, bias) given the statistics it used."""
    if training:
        return aten.native_batch_norm_backward(
            grad, t, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
    # Eval: BatchNorm is the fixed per-channel affine map of the running statistics.
    grad_t = grad * (invstd * weight)[:, None, None]
    xhat = (t - mean[:, None, None]) * invstd[:, None, None]
    return grad_t, (grad * xhat).sum((0, 2, 3)), grad.sum((0, 2, 3))


def _conv_backward(grad: Tensor, t: Tensor, weight: Tensor, padding: int
                   ) -> tuple[Tensor, Tensor]:
    """Gradients of a bias-free stride-1 convolution w.r.t. (input, weight)."""
    grad_t, grad_w, _ = aten.convolution_backward(
        grad, t, weight, None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )
    return grad_t, grad_w


class _GunnLayerFunction(torch.autograd.Function):
    """The whole GUNN layer as one autograd node (see the module docstring).

    Inputs: spec, x, then `_TENSORS_PER_UNIT` tensors per unit in `_unit_tensors` order. Keeps x,
    y, the parameters, per-channel batch statistics and the `spec.keep` conv outputs.
    """

    @staticmethod
    def forward(ctx: Any, spec: _Spec, x: Tensor, *flat: Tensor) -> Tensor:
        o, hid = spec.width, spec.hidden
        buf = x.clone()
        params: list[Tensor] = []
        saved: list[Tensor] = []
        for i in range(spec.segments):
            unit = flat[i * _TENSORS_PER_UNIT : (i + 1) * _TENSORS_PER_UNIT]
            w_in, w_mid, w_out, g_in, b_in, g_mid, b_mid, g_out, b_out = unit[:_PARAMS_PER_UNIT]
            r_in, r_mid, r_out = (unit[j : j + 2] for j in range(_PARAMS_PER_UNIT, 15, 2))
            mom, eps, train = spec.momenta[3 * i :], spec.eps[3 * i :], spec.training
            a = F.conv2d(buf if spec.gradual else x, w_in)
            a_bn, mean_in, inv_in = _bn_forward(a, g_in, b_in, r_in, mom[0], eps[0], train)
            m = F.conv2d(torch.relu_(a_bn[:, :hid]), w_mid, padding=1)
            m_bn, mean_mid, inv_mid = _bn_forward(m, g_mid, b_mid, r_mid, mom[1], eps[1], train)
            c = F.conv2d(torch.relu_(m_bn), w_out)
            c_bn, mean_out, inv_out = _bn_forward(c, g_out, b_out, r_out, mom[2], eps[2], train)
            if spec.projection:
                c_bn.add_(a_bn[:, hid:])
            buf[:, i * o : (i + 1) * o].add_(c_bn)  # y_i = x_i + G_i(z_i), written over x_i
            kept = {"a": a, "m": m, "c": c}
            params += unit[:_PARAMS_PER_UNIT]
            saved += [mean_in, inv_in, mean_mid, inv_mid, mean_out, inv_out]
            saved += [kept[name] for name in spec.keep]
        ctx.spec = spec
        ctx.save_for_backward(x, buf, *params, *saved)
        return buf

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        spec: _Spec = ctx.spec
        o, hid, k, train = spec.width, spec.hidden, spec.segments, spec.training
        x, y, *rest = ctx.saved_tensors
        params, saved = rest[: k * _PARAMS_PER_UNIT], rest[k * _PARAMS_PER_UNIT :]
        per_unit = 6 + len(spec.keep)
        grad_state = grad_y.clone()  # dL/dz_{i+1}; becomes dL/dz_i, ends as dL/dx
        state = y.clone() if spec.gradual else x  # z_{i+1}, turned into z_i segment by segment
        grads: list[Tensor | None] = []
        for i in reversed(range(k)):
            w_in, w_mid, w_out, g_in, b_in, g_mid, b_mid, g_out, _ = params[
                i * _PARAMS_PER_UNIT : (i + 1) * _PARAMS_PER_UNIT
            ]
            mean_in, inv_in, mean_mid, inv_mid, mean_out, inv_out, *kept_list = saved[
                i * per_unit : (i + 1) * per_unit
            ]
            kept = dict(zip(spec.keep, kept_list, strict=True))
            eps = spec.eps[3 * i :]
            seg = slice(i * o, (i + 1) * o)
            if spec.gradual:
                state[:, seg].copy_(x[:, seg])  # z_i = cat(y_<i, x_>=i)
            # dL/dy_i: in the gradual rule it is dL/dz_{i+1}'s segment i (later units read y_i);
            # in the simultaneous rule only the output reads y_i.
            grad_seg = grad_state[:, seg].clone() if spec.gradual else grad_y[:, seg]
            # Recompute what was not kept; BatchNorm uses the saved statistics.
            a = kept["a"] if "a" in kept else F.conv2d(state, w_in)
            h1 = torch.relu(_affine(a[:, :hid], mean_in[:hid], inv_in[:hid], g_in[:hid],
                                    b_in[:hid]))
            m = kept["m"] if "m" in kept else F.conv2d(h1, w_mid, padding=1)
            h2 = torch.relu(_affine(m, mean_mid, inv_mid, g_mid, b_mid))
            c = kept["c"] if "c" in kept else F.conv2d(h2, w_out)
            # Backpropagate dL/dy_i through G_i.
            g_c, d_g_out, d_b_out = _bn_backward(grad_seg, c, g_out, mean_out, inv_out, eps[2],
                                                 train)
            g_h2, d_w_out = _conv_backward(g_c, h2, w_out, 0)
            g_m, d_g_mid, d_b_mid = _bn_backward(aten.threshold_backward(g_h2, h2, 0), m, g_mid,
                                                 mean_mid, inv_mid, eps[1], train)
            g_h1, d_w_mid = _conv_backward(g_m, h1, w_mid, 1)
            g_a_bn = aten.threshold_backward(g_h1, h1, 0)
            if spec.projection:
                g_a_bn = torch.cat([g_a_bn, grad_seg], dim=1)
            g_a, d_g_in, d_b_in = _bn_backward(g_a_bn, a, g_in, mean_in, inv_in, eps[0], train)
            g_z, d_w_in = _conv_backward(g_a, state, w_in, 0)
            grad_state.add_(g_z)
            grads = [d_w_in, d_w_mid, d_w_out, d_g_in, d_b_in, d_g_mid, d_b_mid, d_g_out,
                     d_b_out, *[None] * (_TENSORS_PER_UNIT - _PARAMS_PER_UNIT), *grads]
        return (None, grad_state, *grads)


def _whole_layer(keep: tuple[str, ...]):
    def update_fn(x: Tensor, units: Sequence[GunnUnit], update: str) -> Tensor:
        _check_units(units)
        spec = _Spec(units, update == "gradual", keep)
        return _GunnLayerFunction.apply(spec, x, *_unit_tensors(units))

    return update_fn


for _name, _keep in KEEP.items():
    register_impl(_name)(_whole_layer(_keep))
