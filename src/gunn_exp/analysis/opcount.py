"""Kernel-launching operators of one eager training step, per GUNN implementation (issue 13 §3).

    python -m gunn_exp.analysis.opcount gunn15 --batch 4 --optimizer none   # one line per impl

Counts with `kernels.LaunchCounter` on the CPU what the same step launches on a GPU: forward,
cross-entropy, backward and (unless `--optimizer none`) the SGD update with the chosen kernels.
"""

from __future__ import annotations

import argparse

import torch

from gunn_exp.analysis.harness import sgd
from gunn_exp.analysis.kernels import LaunchCounter, count_launching_ops
from gunn_exp.models import IMPLEMENTATIONS, create_model


def main(argv: list[str] | None = None) -> None:
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
    args = parser.parse_args(argv)
    for impl in args.impls:
        torch.manual_seed(0)
        model = create_model(args.model, impl=impl)
        opt = None if args.optimizer == "none" else sgd(model.parameters(), args.optimizer)
        x = torch.randn(args.batch, 3, args.size, args.size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            count_launching_ops(model, x, optimizer=opt)  # the first step creates momentum buffers
            counter = LaunchCounter()
            n = count_launching_ops(model, x, optimizer=opt, counter=counter)
        print(f"{args.model} {impl}: {n} launching ops ({counter.total} in all)")
        for name, k in counter.by_op.most_common(args.top):
            print(f"    {k:6d} {name}")


if __name__ == "__main__":
    main()
