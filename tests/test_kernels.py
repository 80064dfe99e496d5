"""The kernel counters of gunn_exp.analysis.kernels: dispatch mode (`LaunchCounter`,
`count_launching_ops`) and profiler (`count_launches`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gunn_exp.analysis.kernels import LaunchCounter, count_launches, count_launching_ops
from gunn_exp.models import create_model


class ViewsThenOneKernel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        # view, permute, slice, transpose launch nothing; the multiplication does
        return (x.view(2, -1).t()[:, :2].transpose(0, 1) * self.scale).reshape(2, -1)


def test_views_and_allocations_are_not_counted() -> None:
    counter = LaunchCounter()
    with counter:
        x = torch.randn(2, 6)
        y = x.view(3, 4).t().unsqueeze(0)[0].detach()
        torch.empty(5)
        y.mul(2)
    assert counter.count == 2  # randn, mul
    assert counter.by_op == {"aten.randn": 1, "aten.mul": 1}
    assert counter.total > counter.count


def test_training_step_counts_forward_backward_and_optimizer() -> None:
    model = ViewsThenOneKernel()
    x = torch.randn(2, 6)
    target = torch.tensor([0, 1])
    without = count_launching_ops(model, x, target)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with_opt = count_launching_ops(model, x, target, optimizer=opt)
    assert with_opt > without > 1
    assert model.scale.grad is not None


def test_whole_layer_default_launches_fewer_ops_than_reference() -> None:
    """With many segments per layer (GUNN-15 has 20-30), as in the paper's models."""
    x = torch.randn(2, 3, 8, 8)
    counts = {}
    for impl in ("reference", "recompute"):
        torch.manual_seed(0)
        model = create_model("gunn", widths=(16, 24), segments=(8, 12), stem_width=8, impl=impl)
        counts[impl] = count_launching_ops(model, x)
    assert counts["recompute"] < counts["reference"]


def test_profiler_count_is_one_per_operator_that_does_work() -> None:
    """count_launches: the innermost working operator once, whatever wraps it."""
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    bn = nn.BatchNorm2d(3)
    counters = [torch.zeros(()) for _ in range(4)]

    def step() -> None:
        torch.bmm(a, b)  # calls resolve_conj on both inputs: no kernel of their own
        bn(torch.ones(2, 3, 4, 4))  # ones; native_batch_norm, whose only children allocate
        torch._foreach_add_(counters, 1)  # a loop on CPU, one multi-tensor kernel on CUDA

    # bmm, ones (its fill_), the counter increment, native_batch_norm, foreach: 5.
    assert count_launches(step, torch.device("cpu")) == (0, 5)
