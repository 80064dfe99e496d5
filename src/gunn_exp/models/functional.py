"""Bias-free 1x1 convolution and BatchNorm as plain functions, forward and backward.

The whole-layer Function (`gunn_exp.models.whole_layer`) runs G_i without autograd and
backpropagates through it by hand, so it needs, for each operator of G_i, a forward that returns
what backward will need and an explicit backward. These are those functions; each computes what
the module (`nn.Conv2d`, `nn.BatchNorm2d`, `nn.SyncBatchNorm`) computes, exactly.

1x1 convolutions are matrix products: on CPU they run several times faster than the convolution
kernels for these thin layers, allocate nothing but their result (no layout reorders), and let
backward accumulate dL/dz in place. NCHW and channels_last inputs each map to one GEMM shape.

BatchNorm, as the modules would do it: a training BatchNorm normalises with the batch statistics
and updates its running ones, an eval-mode one is the fixed affine map of its running statistics.
An `nn.SyncBatchNorm` training across processes uses the statistics of the global batch forward
(one all-gather per BatchNorm) and all-reduced gradient reductions backward, as SyncBatchNorm
does, on any device. The statistics (mean, invstd) are returned by the forward and given to the
backward, so a recomputation in backward normalises exactly as the forward did without touching
the running statistics a second time (`bn_affine`, `affine_relu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

aten = torch.ops.aten


def is_channels_last(t: Tensor) -> bool:
    """Whether `t` is laid out channels_last (one contiguous in both layouts counts as NCHW)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def conv1x1(t: Tensor, weight: Tensor) -> Tensor:
    """F.conv2d(t, weight) for a bias-free 1x1 weight."""
    n, c, h, w = t.shape
    w2 = weight.view(weight.shape[0], c)
    if is_channels_last(t):
        return F.linear(t.permute(0, 2, 3, 1), w2).permute(0, 3, 1, 2)
    # bmm over the batch, not matmul: with a weight that requires grad, matmul folds the batch
    # into one GEMM on a transposed copy of t.
    return torch.bmm(w2.expand(n, -1, -1), t.reshape(n, c, h * w)).view(n, -1, h, w)


def conv1x1_backward(
    grad: Tensor, t: Tensor, weight: Tensor, into: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Gradients (weight, input) of `conv1x1(t, weight)`.

    With `into`, the input gradient is added to it in place (one GEMM with accumulation instead of
    a product plus a pass over a C-channel temporary) and `into` is returned.
    """
    n, c, h, w = t.shape
    w2 = weight.view(weight.shape[0], c)
    if is_channels_last(t):
        t2 = t.permute(0, 2, 3, 1).reshape(-1, c)
        g2 = grad.permute(0, 2, 3, 1).reshape(-1, w2.shape[0])
        if into is None:
            grad_t = (g2 @ w2).view(n, h, w, c).permute(0, 3, 1, 2)
        else:
            grad_t, acc = into, into.permute(0, 2, 3, 1).view(-1, c)
            acc.addmm_(g2, w2) if acc.dtype == g2.dtype else acc.add_(g2 @ w2)
        return (g2.t() @ t2).view_as(weight), grad_t
    t3 = t.reshape(n, c, h * w)
    g3 = grad.reshape(n, -1, h * w)
    w2t = w2.t().expand(n, -1, -1)
    if into is None:
        grad_t = torch.bmm(w2t, g3).view(n, c, h, w)
    else:
        grad_t, acc = into, into.view(n, c, h * w)
        acc.baddbmm_(w2t, g3) if acc.dtype == g3.dtype else acc.add_(torch.bmm(w2t, g3))
    return torch.bmm(g3, t3.transpose(1, 2)).sum(0).view_as(weight), grad_t


def bn_momenta(bns: Sequence[nn.BatchNorm2d]) -> list[float]:
    """Count the batch and return the running-average factors, as `_BatchNorm.forward` does.

    The counters of the training BatchNorms are incremented by one foreach op, not one op each.
    """
    tracked = [bn.num_batches_tracked for bn in bns if bn.training]
    if tracked:
        torch._foreach_add_(tracked, 1)
    momenta = []
    for bn in bns:
        if bn.momentum is None:  # cumulative moving average
            momenta.append(1.0 / float(bn.num_batches_tracked) if bn.training else 0.0)
        else:
            momenta.append(bn.momentum)
    return momenta


def sync_group(bn: nn.BatchNorm2d) -> Any:
    """The process group whose statistics `bn` averages over, or None (SyncBatchNorm's rule)."""
    if not isinstance(bn, nn.SyncBatchNorm) or not bn.training:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _sync_batch_stats(t: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel (mean, biased variance, count) over the batches of every rank in `group`.

    Each rank sends its (mean, sum of squared deviations, count) and combines the gathered ones
    with Chan's parallel formula: one collective per BatchNorm, as SyncBatchNorm, and no
    cancellation of large sums. Ranks may hold different batch sizes.
    """
    c = t.shape[1]
    tf = t if t.dtype in (torch.float32, torch.float64) else t.float()
    var, mean = torch.var_mean(tf, dim=(0, 2, 3), correction=0)
    count = torch.full((1,), t.numel() // c, dtype=mean.dtype, device=mean.device)
    local = torch.cat([mean, var * count, count])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    stats = torch.stack(gathered)  # (ranks, 2C + 1)
    means, m2s, counts = stats[:, :c], stats[:, c : 2 * c], stats[:, 2 * c :]
    total = counts.sum()
    mean = (means * counts).sum(0) / total
    var = (m2s + counts * (means - mean).square()).sum(0) / total
    return mean, var, total


def bn_forward(
    t: Tensor,
    weight: Tensor,
    bias: Tensor,
    running: Sequence[Tensor],
    momentum: float,
    eps: float,
    training: bool,
    group: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """BatchNorm forward: (output, mean, invstd, global count); updates running stats in training.

    In eval the statistics returned are the running ones (mean, 1/sqrt(var + eps)), so backward
    has a single recompute path. With a process `group` (SyncBatchNorm across ranks) the batch
    statistics are those of the global batch, whose element count per channel backward needs;
    without one the count is None.
    """
    running_mean, running_var = running
    if group is not None:
        mean, var, total = _sync_batch_stats(t, group)
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (total / (total - 1)), alpha=momentum)
        out = aten.native_batch_norm(t, weight, bias, mean, var, False, 0.0, eps)[0]
        return out, mean, torch.rsqrt(var + eps), total
    out, mean, invstd = aten.native_batch_norm(
        t, weight, bias, running_mean, running_var, training, momentum, eps
    )
    if not training:
        mean, invstd = running_mean.clone(), torch.rsqrt(running_var + eps)
    return out, mean, invstd, None


def bn_affine(mean: Tensor, invstd: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """(scale, shift) of BatchNorm with given statistics: BN(t) = t * scale + shift per channel.

    Elementwise, so one call serves the stacked statistics of every unit of a layer.
    """
    scale = invstd * weight
    return scale, bias - mean * scale


def affine_relu(t: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """relu(t * scale + shift) per channel, in t's dtype (BatchNorm's output dtype)."""
    return torch.relu_(torch.addcmul(shift[:, None, None], t, scale[:, None, None]).to(t.dtype))


def bn_backward(
    grad: Tensor,
    t: Tensor,
    weight: Tensor,
    mean: Tensor,
    invstd: Tensor,
    eps: float,
    training: bool,
    group: Any,
    count: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of BatchNorm w.r.t. (input, weight, bias), given the statistics it used.

    With a process `group` the input gradient uses the global batch's reductions (all-reduced
    here and divided by the global `count`, as SyncBatchNorm does); the weight and bias gradients
    stay this rank's share, which DistributedDataParallel sums like every other parameter
    gradient.
    """
    if group is not None:
        xmu = t - mean[:, None, None]
        sum_dy = grad.sum((0, 2, 3), dtype=mean.dtype)
        sum_dy_xmu = (grad * xmu).sum((0, 2, 3), dtype=mean.dtype)
        reduced = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(reduced, group=group)
        mean_dy, mean_dy_xmu = (reduced / count).chunk(2)
        grad_t = (grad - mean_dy[:, None, None]) - xmu * (invstd.square() * mean_dy_xmu)[
            :, None, None
        ]
        grad_t = (grad_t * (invstd * weight)[:, None, None]).to(t.dtype)
        return grad_t, sum_dy_xmu * invstd, sum_dy.to(weight.dtype)
    if training:
        return aten.native_batch_norm_backward(
            grad, t, weight, None, None, mean, invstd, True, eps, [True, True, True]
        )
    # Eval: BatchNorm is the fixed per-channel affine map of the running statistics.
    xhat = (t - mean[:, None, None]) * invstd[:, None, None]
    grad_t = (grad * (invstd * weight)[:, None, None]).to(t.dtype)
    return grad_t, (grad * xhat).sum((0, 2, 3)), grad.sum((0, 2, 3)).to(weight.dtype)
