"""Model complexity: parameters, multiply-adds, a per-stage table, and one `Summary` per model.

FLOPs come from torch's `FlopCounterMode`, which counts the convolutions and matrix products each
forward dispatches, whichever GUNN implementation issues them (every implementation gives the same
count). BatchNorm, ReLU, pooling and additions are not counted (the usual convention, and the one
of the 0.556 G / 7.75 G figures of docs/SPEC.md §2). MACs = FLOPs / 2. Activation memory:
`gunn_exp.analysis.activations`. Printing: `gunn_exp.analysis.complexity_tables`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gunn_exp.analysis.activations import cuda_peak_bytes, peak_saved_bytes, saved_activation_bytes
from gunn_exp.analysis.paper import PAPER
from gunn_exp.models import GunnLayer, create_model


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def flops_by_module(model: nn.Module, x: Tensor) -> dict[str, int]:
    """FLOPs of one eval-mode forward of the batch `x`, by module path ("Gunn.stages.0"; the
    root is the model's class name, "Global" the total), as torch's FlopCounterMode counts them."""
    was_training = model.training
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model.eval()(x)
    finally:
        model.train(was_training)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def count_macs(model: nn.Module, x: Tensor) -> int:
    """Multiply-adds of one forward of the batch `x` (pass one image for per-image MACs)."""
    return flops_by_module(model, x).get("Global", 0) // 2


@dataclass(frozen=True)
class StageRow:
    """One row of the per-stage table: totals for the batch it was measured on."""

    name: str
    params: int
    macs: int
    output_shape: tuple[int, ...]


def stage_table(model: nn.Module, x: Tensor) -> list[StageRow]:
    """Parameters, MACs and output shape (batch dimension dropped) of stem, each stage, head.

    Works for models laid out as `stem`, `stages` (a Sequential), then head modules, which is
    the case of every registered model.
    """
    # (row name, [(module path below the root, module)])
    groups: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for name, child in model.named_children():
        if name == "stem":
            groups.append(("stem", [(name, child)]))
        elif name == "stages":
            groups += [(f"stage{i + 1}", [(f"stages.{i}", stage)]) for i, stage in enumerate(child)]
        elif groups and groups[-1][0] == "head":
            groups[-1][1].append((name, child))
        else:
            groups.append(("head", [(name, child)]))

    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        modules[-1][1].register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name, modules in groups
    ]
    try:
        flops = flops_by_module(model, x)
    finally:
        for h in handles:
            h.remove()
    root = type(model).__name__
    return [
        StageRow(
            name=name,
            params=sum(count_params(m) for _, m in modules),
            macs=sum(flops.get(f"{root}.{path}", 0) for path, _ in modules) // 2,
            output_shape=shapes[name],
        )
        for name, modules in groups
    ]


@dataclass(frozen=True)
class Summary:
    """Complexity of one model on one input size; every count is per image."""

    model: str
    data: str
    input_shape: tuple[int, ...]
    impl: str
    params: int
    macs: int
    saved_bytes: int | None
    peak_saved_bytes: int | None
    cuda_peak_bytes: int | None
    stages: list[StageRow]

    @property
    def flops(self) -> int:
        return 2 * self.macs


def summarize(
    model: nn.Module, x: Tensor, name: str, data: str, activations: bool = True
) -> Summary:
    """Measure `model` on the batch `x` and report per image (every count divided by batch)."""
    n = x.shape[0]
    impls = sorted({m.impl for m in model.modules() if isinstance(m, GunnLayer)})
    saved = peak = cuda = None
    if activations:
        saved = saved_activation_bytes(model, x) // n
        peak = peak_saved_bytes(model, x) // n
        if x.device.type == "cuda":
            cuda = cuda_peak_bytes(model, x) // n
    rows = [StageRow(r.name, r.params, r.macs // n, r.output_shape) for r in stage_table(model, x)]
    return Summary(
        model=name,
        data=data,
        input_shape=tuple(x.shape[1:]),
        impl=",".join(impls) or "-",
        params=count_params(model),
        macs=sum(r.macs for r in rows),
        saved_bytes=saved,
        peak_saved_bytes=peak,
        cuda_peak_bytes=cuda,
        stages=rows,
    )


def summarize_paper_models(
    impl: str | None = None, activations: bool = True, device: str = "cpu"
) -> list[Summary]:
    """One `Summary` per paper model, each at the input size and class count of its paper row."""
    summaries = []
    for name, ref in PAPER.items():
        options = {} if impl is None else {"impl": impl}
        model = create_model(name, num_classes=ref.num_classes, **options).to(device)
        x = torch.randn(1, 3, ref.image_size, ref.image_size, device=device)
        summaries.append(summarize(model, x, name, ref.data, activations))
        del model
    return summaries
