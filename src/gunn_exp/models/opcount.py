"""Count the ATen operators of a training step that launch work (issue 13 §3).

On a GPU every launched kernel costs microseconds whatever its size, so at the paper's batch of 64
the number of kernels, not the FLOPs, sets GUNN's eager step time. `count_launching_ops` counts,
with a `TorchDispatchMode`, every ATen operator that reaches a backend kernel in one eager training
step (forward, backward and, when given, the optimizer step), leaving out the operators that only
make a new view or allocate (views, `detach`, `empty`, ...): those launch nothing. Device-agnostic,
so it measures on a CPU what the same step would launch on a GPU (give the optimizer the
`foreach`/`fused` settings it would have there).

    python -m gunn_exp.models.opcount gunn15 --batch 4   # one line per implementation
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Not views by schema, but they only allocate or relabel memory: no kernel runs.
_NON_LAUNCHING = {
    aten._unsafe_view.default,
    aten._reshape_alias.default,
    aten.empty.memory_format,
    aten.empty_like.default,
    aten.empty_strided.default,
    aten.new_empty.default,
    aten.new_empty_strided.default,
    aten.lift_fresh.default,
}


def launches_work(func: Any) -> bool:
    """Whether an ATen overload runs a kernel (False for views, detach and bare allocations)."""
    return not (getattr(func, "is_view", False) or func in _NON_LAUNCHING)


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel-launching ATen operators dispatched while active (`count`, `by_op`)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.total = 0  # every operator, views included
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.total += 1
        if launches_work(func):
            self.count += 1
            self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_launching_ops(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    counter: LaunchCounter | None = None,
) -> int:
    """Kernel-launching ATen operators of one eager training step of `model` on `x`.

    The step is forward, cross-entropy against `target` (random labels when None), backward and,
    if `optimizer` is given, `optimizer.step()`; gradients are zeroed (set to None) before, outside
    the count. Pass a `LaunchCounter` as `counter` to read the per-operator breakdown afterwards.
    """
    model.train()
    if target is None:
        num_classes = getattr(model, "num_classes", 10)
        target = torch.randint(0, num_classes, (x.shape[0],), device=x.device)
    model.zero_grad(set_to_none=True)
    counter = counter if counter is not None else LaunchCounter()
    with counter:
        F.cross_entropy(model(x), target).backward()
        if optimizer is not None:
            optimizer.step()
    return counter.count


_OPTIMIZER_FLAGS = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def _main() -> None:
    from gunn_exp.models import IMPLEMENTATIONS, create_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="gunn15")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--impls", nargs="*", default=sorted(IMPLEMENTATIONS))
    parser.add_argument(
        "--optimizer", choices=["none", "loop", "foreach", "fused"], default="foreach"
    )
    parser.add_argument("--bf16", action="store_true", help="under bfloat16 autocast")
    parser.add_argument("--top", type=int, default=0, help="print the N most frequent operators")
    args = parser.parse_args()
    for impl in args.impls:
        torch.manual_seed(0)
        model = create_model(args.model, impl=impl)
        opt = None
        if args.optimizer != "none":
            opt = torch.optim.SGD(
                model.parameters(),
                lr=0.1,
                momentum=0.9,
                nesterov=True,
                weight_decay=1e-4,
                **_OPTIMIZER_FLAGS[args.optimizer],
            )
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            count_launching_ops(model, x, optimizer=opt)  # first step creates momentum buffers
            counter = LaunchCounter()
            n = count_launching_ops(model, x, optimizer=opt, counter=counter)
        print(f"{args.model} {impl}: {n} launching ops ({counter.total} in all)")
        for name, k in counter.by_op.most_common(args.top):
            print(f"    {k:6d} {name}")


if __name__ == "__main__":
    _main()
