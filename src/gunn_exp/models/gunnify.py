"""`gunnify`: GUNN's gradual update (docs/SPEC.md §1) on the residual blocks of any CNN.

A shape-preserving residual block computes y = act(x + F(x)). Cut its C channels into K segments
and let segment i be rewritten by the block restricted to segment i's outputs, reading a view in
which the segments before i already hold their new values:

    for i = 1 .. K:
        z_i = cat(y_1 .. y_{i-1}, x_i .. x_K)
        y_i = act(x_i + G_i(z_i))                   # G_i: F restricted to segment i's outputs

With every G_i reading x instead (`update="simultaneous"`) this is the original block. A branch
of several layers cannot keep both its parameters and its multiply-adds under K orderings, so
`mode` makes the trade explicit (docs/MODELS.md "gunnify" has the table for ResNet-18/50):

- `exact`: the same parameters; G_i is F restricted to segment i's outputs, so every G_i runs
  F's hidden layers on its own z_i (K times their multiply-adds) and the rows of F's last conv
  that write segment i. The hidden BatchNorms see the K inputs z_i one after another: in training
  each call normalises with its own batch statistics and updates the running statistics (K
  updates per step, not one).
- `split`: the paper's construction: F's hidden channels are cut into K groups too, and G_i owns
  group i (the first conv's rows of group i reading all of z_i, the diagonal blocks of the later
  convs). Multiply-adds and the parameters in use fall to about 1/K of the later convs'; the
  off-diagonal blocks stay in the state dict, unused (zero gradient).

The conversion works in place, the way `SyncBatchNorm.convert_sync_batchnorm` and timm's
`freeze_batch_norm_2d` walk a model: each convertible block is replaced in its parent by a
`GradualBlock` holding the *same* child modules under the same names, so parameters stay the same
objects, state-dict keys do not change and torchvision/timm weights still load. Recognised: the
BasicBlock and Bottleneck of torchvision, timm and this package's CIFAR ResNets, and `Residual`,
the generic wrapper for any shape-preserving branch (exact mode only: its layers are unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn_exp.errors import ConfigError
from gunn_exp.models.layer import UPDATES

MODES = ("exact", "split")
BLOCK_NAMES = ("BasicBlock", "Bottleneck")  # torchvision's, timm's and resnet_cifar's classes
# Children a recognised block may have besides its layers; each must be absent or do nothing.
OPTIONAL_NOOPS = ("drop_block", "aa", "se", "drop_path", "downsample", "shortcut")


class Residual(nn.Module):
    """y = act(x + branch(x)) for any `branch` that keeps the input's shape: the generic residual
    block `gunnify` converts (in `exact` mode: G_i runs the whole branch on z_i and keeps segment
    i's outputs, K times the branch's multiply-adds). `act` is applied element-wise (default:
    none)."""

    def __init__(self, branch: nn.Module, act: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.branch(x))


@dataclass(frozen=True)
class Layout:
    """How a recognised block computes its branch, by child name: `layers` is the (conv, norm,
    activation or None) chain of F, `out_act` the activation after the add. `branch` names the
    child of a generic `Residual` (then `layers` is empty)."""

    layers: tuple[tuple[str, str, str | None], ...] = ()
    out_act: str | None = None
    branch: str | None = None


def block_layout(block: nn.Module) -> Layout | None:
    """The layout of a residual block gunnify knows (None: not a residual block it knows)."""
    if isinstance(block, Residual):
        return Layout(out_act="act", branch="branch")
    if type(block).__name__ not in BLOCK_NAMES or not hasattr(block, "conv2"):
        return None
    children = dict(block.named_children())
    convs = [n for n in ("conv1", "conv2", "conv3") if n in children]
    # torchvision and resnet_cifar use one `relu` throughout; timm act1 .. act<n>, the last one
    # after the add.
    acts = [f"act{i + 1}" if f"act{i + 1}" in children else "relu" for i in range(len(convs))]
    norms = [f"bn{i + 1}" for i in range(len(convs))]
    if any(name not in children for name in acts + norms):
        return None
    layers = tuple(
        (conv, norms[i], acts[i] if i < len(convs) - 1 else None) for i, conv in enumerate(convs)
    )
    return Layout(layers=layers, out_act=acts[-1])


def conversion_problem(block: nn.Module, layout: Layout, segments: int, mode: str) -> str | None:
    """Why `block` cannot be gunnified with `segments` and `mode` (None: it can)."""
    children = dict(block.named_children())
    for name in OPTIONAL_NOOPS:
        child = children.get(name)
        if child is not None and not isinstance(child, nn.Identity):
            what = "a downsample path" if name in ("downsample", "shortcut") else f"a {name}"
            return f"has {what} ({type(child).__name__})"
    known = {n for layer in layout.layers for n in layer if n} | {layout.out_act, layout.branch}
    unknown = sorted(set(children) - known - set(OPTIONAL_NOOPS))
    if unknown:
        return f"has modules gunnify does not know how to run: {unknown}"
    if layout.branch is not None:
        if mode == "split":
            return "is a generic Residual: mode=split needs the branch's layers (use mode=exact)"
        return None
    convs = [children[c] for c, _, _ in layout.layers]
    norms = [children[n] for _, n, _ in layout.layers]
    if not all(isinstance(c, nn.Conv2d) and c.padding_mode == "zeros" for c in convs):
        return "has a convolution that is not a zero-padded nn.Conv2d"
    if any(c.stride != (1, 1) for c in convs):
        return "has stride != 1 (its output is smaller than its input)"
    channels = convs[0].in_channels
    if convs[-1].out_channels != channels:
        return f"changes the channels ({channels} -> {convs[-1].out_channels})"
    if channels % segments:
        return f"has {channels} channels, not divisible by segments={segments}"
    if not isinstance(norms[-1], nn.modules.batchnorm._BatchNorm):
        return f"ends in {type(norms[-1]).__name__}, not a BatchNorm gunnify can cut by channel"
    if mode == "split":
        if any(c.groups != 1 for c in convs):
            return "has a grouped convolution (mode=split cuts the hidden channels itself)"
        hidden = [c.out_channels for c in convs[:-1]]
        if any(h % segments for h in hidden):
            return f"has hidden widths {hidden}, not divisible by segments={segments}"
        if not all(isinstance(n, nn.modules.batchnorm._BatchNorm) for n in norms):
            return "has a normalisation that is not a BatchNorm (mode=split cuts it by channel)"
    elif convs[-1].groups != 1:
        return "ends in a grouped convolution"
    return None


def conv_rows(conv: nn.Conv2d, x: Tensor, rows: slice, cols: slice | None = None) -> Tensor:
    """`conv(x)` for the output channels `rows` only (reading the input channels `cols`)."""
    weight = conv.weight[rows] if cols is None else conv.weight[rows, cols]
    bias = None if conv.bias is None else conv.bias[rows]
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def norm_rows(norm: nn.modules.batchnorm._BatchNorm, x: Tensor, rows: slice, count: bool) -> Tensor:
    """`norm` applied to channels `rows` of its input, as `_BatchNorm.forward` applies it to all:
    batch statistics in training, running statistics (updated in place, those rows only) in
    evaluation. `count`: this call advances `num_batches_tracked` (once per forward pass, as the
    whole module would)."""
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.training and norm.track_running_stats and norm.num_batches_tracked is not None:
        if count:
            norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            factor = 1.0 / float(norm.num_batches_tracked)
    use_batch = norm.training or (norm.running_mean is None and norm.running_var is None)
    track = not norm.training or norm.track_running_stats
    mean = norm.running_mean[rows] if track and norm.running_mean is not None else None
    var = norm.running_var[rows] if track and norm.running_var is not None else None
    weight = None if norm.weight is None else norm.weight[rows]
    bias = None if norm.bias is None else norm.bias[rows]
    return F.batch_norm(x, mean, var, weight, bias, use_batch, factor, norm.eps)


@dataclass
class BlockParts:
    """One forward pass of a residual block, taken apart (what the singularity probe measures):
    the output, the increments G_i(z_i) (one per segment, in order) and, per G_i, its hidden
    activations (after their activation function). Where the G_i share one hidden computation
    (the simultaneous update in exact mode, a plain block) `hidden` has one entry."""

    output: Tensor
    increments: list[Tensor]
    hidden: list[list[Tensor]] = field(default_factory=list)


class GradualBlock(nn.Module):
    """A residual block updated segment by segment (module docstring), made by `gunnify`.

    Holds the original block's children under their names (same objects, same state-dict keys);
    `layout` says how they compute the branch. `segments` K, `update` gradual | simultaneous and
    `mode` exact | split as in `gunnify`.
    """

    def __init__(
        self, block: nn.Module, layout: Layout, segments: int, update: str, mode: str
    ) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.layout = layout
        self.segments = segments
        self.update = update
        self.mode = mode
        self.source = type(block).__name__

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x, record=False).output

    def parts(self, x: Tensor, record: bool = True) -> BlockParts:
        """The forward pass; with `record`, also the increments and hidden activations."""
        k = self.segments
        width = x.shape[1] // k
        xs = list(x.split(width, dim=1))
        act = self._act(self.layout.out_act)
        if self.update == "simultaneous" and self.mode == "exact":  # the original block
            hidden = self._hidden(x)
            delta = self._last_whole(hidden[-1] if hidden else x)
            out = act(x + delta)
            incs = list(delta.split(width, dim=1)) if record else []
            return BlockParts(out, incs, [hidden] if record else [])
        ys: list[Tensor] = []
        incs, hiddens = [], []
        for i in range(k):
            z = x if self.update == "simultaneous" else torch.cat(ys + xs[i:], dim=1)
            hidden, delta = self._segment(z, i)
            ys.append(act(xs[i] + delta))
            if record:
                incs.append(delta)
                hiddens.append(hidden)
        return BlockParts(torch.cat(ys, dim=1), incs, hiddens)

    def _act(self, name: str | None) -> nn.Module:
        return nn.Identity() if name is None else getattr(self, name)

    def _hidden(self, z: Tensor) -> list[Tensor]:
        """F's hidden activations on z, whole layers (exact mode)."""
        hidden = []
        for conv, norm, act in self.layout.layers[:-1]:
            z = self._act(act)(getattr(self, norm)(getattr(self, conv)(z)))
            hidden.append(z)
        return hidden

    def _last_whole(self, h: Tensor) -> Tensor:
        if self.layout.branch is not None:
            return getattr(self, self.layout.branch)(h)
        conv, norm, _ = self.layout.layers[-1]
        return getattr(self, norm)(getattr(self, conv)(h))

    def _segment(self, z: Tensor, i: int) -> tuple[list[Tensor], Tensor]:
        """(G_i's hidden activations, G_i(z)) for segment i."""
        width = z.shape[1] // self.segments
        rows = slice(i * width, (i + 1) * width)
        first = i == 0  # each cut BatchNorm counts one batch per forward pass
        if self.layout.branch is not None:  # generic: the whole branch, segment i's outputs
            return [], getattr(self, self.layout.branch)(z)[:, rows]
        if self.mode == "exact":
            hidden = self._hidden(z)
            conv, norm, _ = self.layout.layers[-1]
            h = conv_rows(getattr(self, conv), hidden[-1], rows)
            return hidden, norm_rows(getattr(self, norm), h, rows, first)
        hidden, h, cols = [], z, None  # split: G_i owns hidden group i of every layer
        for j, (conv_name, norm_name, act) in enumerate(self.layout.layers):
            conv = getattr(self, conv_name)
            last = j == len(self.layout.layers) - 1
            out_rows = rows if last else _group(conv.out_channels, self.segments, i)
            h = conv_rows(conv, h, out_rows, cols)
            h = norm_rows(getattr(self, norm_name), h, out_rows, first)
            if not last:
                h = self._act(act)(h)
                hidden.append(h)
            cols = out_rows
        return hidden, h

    def unused_parameters(self) -> int:
        """Parameter entries the forward pass never reads: in split mode the off-diagonal blocks
        of the convs after the first (they stay in the state dict, with zero gradient)."""
        if self.mode != "split" or self.layout.branch is not None:
            return 0
        weights = [getattr(self, conv).weight for conv, _, _ in self.layout.layers[1:]]
        return sum(w.numel() - w.numel() // self.segments for w in weights)

    def filters(self) -> list[Tensor]:
        """Groups of G_i's convolution filters (one row per output channel) that read the same
        input channels: what the weight-overlap statistic compares within each group."""
        return branch_filters(self, self.layout, self.segments, self.mode)

    def extra_repr(self) -> str:
        return f"{self.source}, segments={self.segments}, update={self.update}, mode={self.mode}"


def branch_filters(
    block: nn.Module, layout: Layout, segments: int = 1, mode: str = "exact"
) -> list[Tensor]:
    """Filter groups of a block's branch (see `GradualBlock.filters`): each conv's output
    filters, flattened; in split mode the first conv's rows (all read z_i) and, for the later
    convs, G_i's diagonal block per segment (they read different hidden groups)."""
    if layout.branch is not None:
        branch = getattr(block, layout.branch)
        return [m.weight.flatten(1) for m in branch.modules() if isinstance(m, nn.Conv2d)]
    groups = []
    for j, (name, _, _) in enumerate(layout.layers):
        weight = getattr(block, name).weight
        if mode == "exact" or j == 0:
            groups.append(weight.flatten(1))
            continue
        for i in range(segments):
            rows = _group(weight.shape[0], segments, i)
            groups.append(weight[rows, _group(weight.shape[1], segments, i)].flatten(1))
    return groups


def _group(channels: int, segments: int, i: int) -> slice:
    width = channels // segments
    return slice(i * width, (i + 1) * width)


@dataclass
class GunnifyReport:
    """What `gunnify` did: the converted blocks' names and, for the residual blocks it left as
    they were, why."""

    converted: list[str]
    skipped: dict[str, str]

    def summary(self) -> str:
        skipped = "; ".join(f"{name} {why}" for name, why in self.skipped.items())
        return f"gunnify: converted {len(self.converted)} block(s) {self.converted}" + (
            f"; left as they are: {skipped}" if skipped else ""
        )


def gunnify(
    model: nn.Module,
    segments: int,
    update: str = "gradual",
    mode: str = "exact",
    blocks: Sequence[str] | None = None,
) -> GunnifyReport:
    """Give `model`'s residual blocks GUNN's gradual update, in place (module docstring).

    Args:
        model: any network; its recognised residual blocks (torchvision/timm/resnet_cifar
            BasicBlock and Bottleneck, `Residual`) are replaced by `GradualBlock`s.
        segments: K, the number of channel segments (must divide each converted block's
            channels; K=1 leaves every block's function as it was).
        update: "gradual" (GUNN) or "simultaneous" (every G_i reads x: in exact mode, the
            original block).
        mode: "exact" (same parameters, more multiply-adds) or "split" (the paper's
            construction: hidden channels cut into K groups).
        blocks: qualified names of the blocks to convert; None converts every block that can be
            converted and reports the others (a downsample path, stride != 1, channels not
            divisible by K, ...). A named block that cannot be converted is refused.

    Returns:
        The converted and the skipped blocks (name -> reason).

    Raises:
        ConfigError: a bad `segments`, `update` or `mode`; a named block that is not a residual
            block or cannot be converted; no block converted at all.
    """
    if not isinstance(segments, int) or isinstance(segments, bool) or segments < 1:
        raise ConfigError(f"gunnify: segments={segments!r} must be a positive integer.")
    if update not in UPDATES:
        raise ConfigError(f"gunnify: update={update!r} is not one of {UPDATES}.")
    if mode not in MODES:
        raise ConfigError(f"gunnify: mode={mode!r} is not one of {MODES}.")
    found = {
        name: (module, layout)
        for name, module in model.named_modules()
        if name and (layout := block_layout(module)) is not None
    }
    if blocks is not None:
        unknown = [b for b in blocks if b not in found]
        if unknown:
            raise ConfigError(
                f"gunnify: {unknown} are not residual blocks gunnify knows; the model's are "
                f"{list(found) or 'none'}."
            )
    report = GunnifyReport([], {})
    for name, (module, layout) in found.items():
        if blocks is not None and name not in blocks:
            continue
        problem = conversion_problem(module, layout, segments, mode)
        if problem is not None:
            if blocks is not None:
                raise ConfigError(f"gunnify: block {name} cannot be converted: it {problem}.")
            report.skipped[name] = problem
            continue
        _replace(model, name, GradualBlock(module, layout, segments, update, mode))
        report.converted.append(name)
    if not report.converted:
        why = "; ".join(f"{n} {p}" for n, p in report.skipped.items()) or "it has none"
        raise ConfigError(
            f"gunnify: no residual block of {type(model).__name__} could be converted with "
            f"segments={segments}, mode={mode} ({why})."
        )
    return report


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def gradual_blocks(model: nn.Module) -> Iterable[tuple[str, GradualBlock]]:
    """The model's gunnified blocks with their qualified names, in forward order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, GradualBlock))


def gunnify_options(options: Any) -> dict[str, Any] | None:
    """The `gunnify` options of a model config (a mapping; `segments` None: off), or None."""
    if options is None:
        return None
    options = dict(options)
    if options.get("segments") is None:
        return None
    if options.get("blocks") is not None:
        options["blocks"] = list(options["blocks"])
    return {k: v for k, v in options.items() if v is not None}
