"""Model complexity: parameters, multiply-adds, activation memory and a per-stage table.

Counting rules, stated once:
- FLOPs come from torch's `FlopCounterMode`, which counts the convolutions and matrix products
  each forward dispatches, whichever GUNN implementation issues them (every implementation gives
  the same count). BatchNorm, ReLU, pooling and additions are not counted (the usual convention,
  and the one of the 0.556 G / 7.75 G figures of docs/SPEC.md §2). MACs = FLOPs / 2.
- Activation memory is measured, not estimated, for the model's *current* implementation: one
  training-mode forward under `torch.autograd.graph.saved_tensors_hooks` records every tensor
  autograd keeps for backward (each storage counted once, parameters excluded).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from gunn_exp.models import GunnLayer, create_model


@dataclass(frozen=True)
class PaperModel:
    """Where and how big the paper says a model is (docs/SPEC.md §2, §4); None where it gives
    nothing."""

    data: str
    num_classes: int
    image_size: int
    params: str
    macs: str | None
    reconstructed: bool


PAPER = {
    "gunn15": PaperModel("cifar10", 10, 32, "1.6M", "0.556G", False),
    "gunn24": PaperModel("cifar10", 10, 32, "29.6M", None, True),
    "gunn18": PaperModel("imagenet", 1000, 224, "28.9M", "7.75G", False),
    "wide_gunn18": PaperModel("imagenet", 1000, 224, "45.6M", None, True),
}


def paper_reference(name: str) -> PaperModel | None:
    """The paper's figures for a registered model; a SUNN twin shares its GUNN's."""
    return PAPER.get(name.replace("sunn", "gunn"))


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


class _SavedTensorTracker:
    """Pack/unpack hooks that account the bytes autograd holds for backward, storage by storage.

    Every packed tensor is wrapped in a `_Held` handle; when autograd drops the handle (after
    backward used it) the storage's count goes down, so `live` follows what is held at any moment
    and `peak` is its maximum, recomputation inside backward included.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: Tensor) -> object:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.excluded or storage.nbytes() == 0:
            return t
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.sizes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        return _Held(self, ptr, t)

    @staticmethod
    def unpack(packed: object) -> Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed  # type: ignore[return-value]

    def release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.sizes.pop(ptr)
            del self.refs[ptr]


class _Held:
    """A saved tensor plus a callback to its tracker when autograd lets go of it."""

    def __init__(self, tracker: _SavedTensorTracker, ptr: int, tensor: Tensor) -> None:
        self.tracker, self.ptr, self.tensor = tracker, ptr, tensor

    def __del__(self) -> None:
        self.tracker.release(self.ptr)


@contextmanager
def _training_step(model: nn.Module) -> Iterator[None]:
    """Training mode for a measurement, leaving no trace: mode, buffers and grads are restored."""
    was_training = model.training
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad for p in model.parameters()]
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g


def _track_training_step(model: nn.Module, x: Tensor, backward: bool) -> tuple[int, int]:
    """(bytes held for backward after the forward, most held at any moment) for one step."""
    tracker = _SavedTensorTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    hooks = torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack)
    with _training_step(model), hooks:
        out = model(x)
        after_forward = tracker.live
        if backward:
            out.float().sum().backward()
        del out
    return after_forward, tracker.peak


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes autograd holds for backward after one training-mode forward of the batch `x`.

    Uses the model's current GUNN implementation. Counts tensors saved through autograd
    (including `ctx.save_for_backward` of custom Functions), each storage once, parameters
    excluded. The model's mode, BatchNorm statistics and gradients are left as they were.
    """
    return _track_training_step(model, x, backward=False)[0]


def peak_saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Most bytes held for backward at any moment of a training forward + backward of `x`.

    Exceeds `saved_activation_bytes` only for implementations that recompute in backward and
    save the recomputed tensors through autograd again.
    """
    return _track_training_step(model, x, backward=True)[1]


def cuda_peak_bytes(model: nn.Module, x: Tensor) -> int:
    """Peak CUDA memory a training forward + backward of `x` adds to what was allocated before.

    Measured by the CUDA caching allocator: activations, workspaces and the gradients.
    """
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    with _training_step(model):
        model(x).float().sum().backward()
    torch.cuda.synchronize(x.device)
    return torch.cuda.max_memory_allocated(x.device) - before


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


def giga(n: int) -> str:
    """Multiply-adds or FLOPs in G, three significant digits, the way papers quote them."""
    return f"{n / 1e9:.3g}G"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def shape(s: tuple[int, ...]) -> str:
    return "x".join(map(str, s))


def summary_lines(s: Summary) -> list[list[str]]:
    """[quantity, ours, paper] rows of a model's summary (memory rows only where measured)."""
    ref = paper_reference(s.model)
    rows = [
        ["Parameters", f"{s.params:,}", ref.params if ref else ""],
        [
            "Multiply-adds per image",
            f"{s.macs:,} ({giga(s.macs)})",
            (ref.macs or "not given") if ref else "",
        ],
        ["FLOPs per image (2 x MACs)", f"{s.flops:,} ({giga(s.flops)})", ""],
    ]
    if s.saved_bytes is not None:
        rows.append(["Saved for backward per image", f"{mib(s.saved_bytes)} (impl {s.impl})", ""])
    if s.peak_saved_bytes is not None:
        rows.append(["Peak saved, forward + backward", mib(s.peak_saved_bytes), ""])
    if s.cuda_peak_bytes is not None:
        rows.append(["CUDA peak, training step", mib(s.cuda_peak_bytes), ""])
    return rows


def _md_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown table: the first `text_columns` left-aligned, the numbers right-aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join([line(header), line(align), *map(line, rows)])


STAGE_HEADER = ["stage", "params", "MACs per image", "output (CxHxW)"]


def stage_cells(r: StageRow) -> list[str]:
    return [r.name, f"{r.params:,}", f"{r.macs:,}", shape(r.output_shape)]


def markdown_summary(s: Summary) -> str:
    """A model's summary and stage table as Markdown."""
    title = f"**{s.model}** on {s.data} (input {shape(s.input_shape)})"
    summary = _md_table(["", "ours", "paper"], summary_lines(s))
    stages = _md_table(STAGE_HEADER, [stage_cells(r) for r in s.stages])
    return f"{title}\n\n{summary}\n\n{stages}\n"


ZOO_HEADER = [
    "model",
    "data (input)",
    "params",
    "paper params",
    "MACs",
    "paper MACs",
    "FLOPs",
    "saved for backward / image",
]


def zoo_cells(s: Summary) -> list[str]:
    ref = PAPER[s.model]
    name = s.model + (" (reconstructed)" if ref.reconstructed else "")
    return [
        name,
        f"{s.data} ({shape(s.input_shape)})",
        f"{s.params:,}",
        ref.params,
        giga(s.macs),
        ref.macs or "not given",
        giga(s.flops),
        f"{mib(s.saved_bytes)} ({s.impl})",
    ]


def markdown_zoo(summaries: list[Summary]) -> str:
    """The paper models side by side as one Markdown table."""
    return _md_table(ZOO_HEADER, [zoo_cells(s) for s in summaries], text_columns=2) + "\n"


METHOD = (
    "MACs: forward hooks on Conv2d/Linear with the reference GUNN implementation (BN, ReLU, "
    "pooling, additions not counted); FLOPs = 2 x MACs. Saved for backward: storages autograd "
    "holds after a training forward, measured with saved_tensors_hooks for the impl shown."
)


def print_summary(s: Summary, fmt: str = "rich") -> None:
    """Print a model's summary and stage table as rich tables or Markdown."""
    if fmt == "markdown":
        print(markdown_summary(s) + f"\n{METHOD}")
        return
    console = Console()
    title = f"{s.model} on {s.data} (input {shape(s.input_shape)})"
    table = _rich_table(title, ["", "ours", "paper"], summary_lines(s))
    console.print(table)
    console.print(_rich_table("Per stage", STAGE_HEADER, [stage_cells(r) for r in s.stages]))
    console.print(METHOD, style="dim")


def print_zoo(summaries: list[Summary], fmt: str = "rich") -> None:
    """Print the paper models side by side as a rich table or Markdown."""
    if fmt == "markdown":
        print(markdown_zoo(summaries) + f"\n{METHOD}")
        return
    console = Console()
    console.print(_rich_table("Paper models", ZOO_HEADER, [zoo_cells(s) for s in summaries]))
    console.print(METHOD, style="dim")


def _rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table
