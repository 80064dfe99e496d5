"""The GUNN network (docs/SPEC.md §2): a stem, stages of [transition, GUNN layers, pooling], a head.

The constructor's arguments are the architecture (as in torchvision's resnet.py): every paper model
is one call with different numbers, and a new GUNN is defined by choosing new numbers (in Python or
in a Hydra YAML through the registry's generic `gunn` builder).

The model API is timm's (see `ImageClassifier`), so training, evaluation and benchmark code, and
timm itself (`gunn_exp.timm`), treat every model alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gunn_exp.models.layer import GunnLayer, GunnUnit, divisors_near

STEMS = ("cifar", "imagenet")
POOLS = ("before", "after")


def conv_bn_relu(in_chans: int, out_chans: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    """Bias-free Conv-BN-ReLU (the paper's transition block when kernel=1)."""
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


def init_weights(model: nn.Module, zero_init_last: bool = False) -> None:
    """docs/SPEC.md §2 init: convs kaiming normal (fan_out, relu); BN weight 1, bias 0; Linear
    bias 0.

    Linear weights keep PyTorch's default init, as in the authors' Torch7 code. Each `GunnUnit`
    then initialises itself (its fused first conv is two convs with their own fan_out), with the
    gamma of its last BatchNorms zeroed if `zero_init_last` (see `GunnUnit.reset_parameters`).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, GunnUnit):
            m.reset_parameters(zero_init_last=zero_init_last)


class GlobalPool(nn.Module):
    """Global pooling to one vector per image ("avg", "max", "avgmax": their mean, as timm's), or
    none ("": the feature map). timm's "catavgmax" (twice the width) is not offered.

    `pool_type` is where timm reads a model's pooling (save_for_hf, reset_classifier).
    """

    TYPES = ("avg", "max", "avgmax", "")

    def __init__(self, pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in self.TYPES:
            raise ValueError(
                f"global_pool={pool_type!r} is not supported; choose one of {self.TYPES}."
            )
        self.pool_type = pool_type

    def forward(self, x: Tensor) -> Tensor:
        if self.pool_type == "avg":
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.pool_type == "max":
            return F.adaptive_max_pool2d(x, 1).flatten(1)
        if self.pool_type == "avgmax":
            return 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1)
        return x

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type!r}"


def take_indices(num_taps: int, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
    """timm's tap selection: None all taps, an int the last n, a sequence those (negative from
    the end). Returns (sorted absolute indices, largest index)."""
    if indices is None:
        indices = num_taps
    if isinstance(indices, int):
        if not 0 < indices <= num_taps:
            raise ValueError(f"indices={indices}: take the last 1..{num_taps} feature taps.")
        taken = list(range(num_taps - indices, num_taps))
    else:
        taken = sorted(i + num_taps if i < 0 else i for i in indices)
        if not taken or not 0 <= taken[0] <= taken[-1] < num_taps:
            raise ValueError(
                f"indices={list(indices)}: feature taps are numbered 0..{num_taps - 1} "
                f"(or -{num_taps}..-1)."
            )
    return taken, max(taken)


def _tap_split(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, tail) of a block: a trailing pooling layer is the tail, so a feature tap sees the
    block's full-resolution output (ImageNet stem before its max pool, ImageNet-layout stages
    before their closing AvgPool)."""
    pools = (nn.AvgPool2d, nn.MaxPool2d)
    if isinstance(block, nn.Sequential) and len(block) > 1 and isinstance(block[-1], pools):
        return block[:-1], block[-1]
    return block, nn.Identity()


def _tap_name(name: str, block: nn.Module) -> str:
    """Qualified name of the module whose output a block's feature tap is (see `_tap_split`)."""
    _, tail = _tap_split(block)
    return name if isinstance(tail, nn.Identity) else f"{name}.{list(block._modules)[-2]}"


class ImageClassifier(nn.Module):
    """Shared head and the timm model API; subclasses build `stem`, `stages` and `head`.

    Layout: stem -> stages -> head (a final conv, or Identity) -> global pool -> dropout -> fc.
    API (timm's names and signatures): `forward_features` (unpooled feature map),
    `forward_head`, `get_classifier`, `reset_classifier(num_classes, global_pool)`,
    `feature_info` (one tap after the stem and one per stage, see `_tap_split`),
    `forward_intermediates`, `prune_intermediate_layers`, `set_grad_checkpointing`,
    `group_matcher`, `num_features`, `head_hidden_size`, `num_classes`.

    Subclasses set `stem`, `stages` (an nn.Sequential), `head` and `feature_info` (no class-level
    annotations: `torch.jit.script` would read them as attribute types).
    """

    def _build_head(
        self, num_features: int, num_classes: int, drop_rate: float, global_pool: str = "avg"
    ) -> None:
        self.num_features = num_features
        # timm 1.0: the width forward_head(pre_logits=True) returns; num_features here, as there
        # is no pre-logits layer between the pooling and the classifier.
        self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, global_pool)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier by a freshly initialised one (0: none, return the features);
        `global_pool` ("avg", "max", "avgmax", "": none) replaces the pooling too when given."""
        if num_classes < 0:
            raise ValueError(
                f"num_classes={num_classes} must be >= 0 (0: no classifier, the pooled features "
                f"come out)."
            )
        pool = self.global_pool if global_pool is None else GlobalPool(global_pool)
        if pool.pool_type == "" and num_classes > 0:
            raise ValueError(
                f"global_pool='' (no pooling) needs num_classes=0, got num_classes={num_classes}."
            )
        self.global_pool = pool
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Identity()
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes)
            nn.init.zeros_(self.fc.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward instead of keeping its activations (training only).

        Works with every GUNN implementation. As with any checkpointed BatchNorm, the recomputed
        forward updates the running statistics a second time.
        """
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay: the stem, then one per stage (the
        head conv and classifier follow the last)."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}

    def _run_stages(self, x: Tensor) -> Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for stage in self.stages:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.stages(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch -> unpooled feature map with `num_features` channels."""
        return self.head(self._run_stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits (or the pooled, dropped-out features when pre_logits)."""
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """The feature taps of `feature_info` (timm's signature; `norm` has nothing to apply:
        the models have no final norm layer). Returns the taps, or (final feature map, taps)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r}: these models only produce 'NCHW'.")
        taken, last = take_indices(len(self.feature_info), indices)
        blocks = [self.stem, *self.stages]
        if stop_early or intermediates_only:
            blocks = blocks[: last + 1]
        taps = []
        for i, block in enumerate(blocks):
            body, tail = _tap_split(block)
            if self.grad_checkpointing and torch.is_grad_enabled() and i > 0:
                x = checkpoint(body, x, use_reentrant=False)
            else:
                x = body(x)
            if i in taken:
                taps.append(x)
            x = tail(x)
        if intermediates_only:
            return taps
        return self.head(x), taps

    def prune_intermediate_layers(
        self,
        indices: int | Sequence[int] | None = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last tap in `indices` (and the classifier when
        `prune_head`, the head conv when `prune_norm` or stages were dropped); returns the
        absolute tap indices, as timm's FeatureGetterNet expects."""
        taken, last = take_indices(len(self.feature_info), indices)
        pruned_end = last < len(self.feature_info) - 1
        self.stages = self.stages[:last]
        if pruned_end or prune_norm:
            self.head = nn.Identity()  # sized for the last stage's width
        if pruned_end:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
        if prune_head or pruned_end:
            self.reset_classifier(0, "")
        return taken


class Gunn(ImageClassifier):
    """Gradually Updated Neural Network.

    Layout: stem -> stage_1 .. stage_S -> [1x1 head conv] -> global avg pool -> dropout -> Linear.
    Stage s: Conv1x1-BN-ReLU transition to widths[s], then layers_per_stage[s] GUNN layers of
    widths[s] channels and segments[s] segments, with one AvgPool2 placed per `pool`.

    Args:
        widths: channels of each stage.
        segments: K of each stage's GUNN layers (must divide the stage's width).
        layers_per_stage: GUNN layers per stage (one int for all stages, or one per stage).
        stem: "cifar" (Conv3x3 stride 1) or "imagenet" (Conv7x7 stride 2 + MaxPool 3/2/1).
        stem_width: output channels of the stem conv.
        projection: give every segment function the 1x1 projection branch (CIFAR models) or not.
        pool: where the stride-2 AvgPool sits. "before": in stages 2..S, between the transition
            and the GUNN layers (CIFAR models). "after": after the GUNN layers of stages 1..S-1
            (ImageNet models); the last stage is reduced by the global pooling only.
        head_width: channels of an optional Conv1x1-BN-ReLU before global pooling (GUNN-15 has
            one, GUNN-18 none); None for no head conv.
        num_classes: classifier outputs; 0 gives a model without classifier (features only).
        in_chans: input image channels.
        update: "gradual" (GUNN) or "simultaneous" (the SUNN ablation, docs/SPEC.md §1).
        impl: GUNN layer implementation; None uses GunnLayer's default.
        drop_rate: dropout probability before the classifier.
        zero_init_last: start every segment function G_i at 0 (gamma of its last BatchNorms 0),
            a deviation from the authors' init (all gammas 1), which stays the default.
        global_pool: "avg" (the paper's), "max", or "" (no pooling; needs num_classes=0).

    Feature taps (`feature_info`, `forward_intermediates`): the stem's output (the ImageNet stem
    before its max pool, stride 2) and each stage's output; in the ImageNet layout a stage is
    tapped after its GUNN layers, before its closing AvgPool, so the taps have strides 2, 4, 8,
    16, 32 like torchvision's and timm's ResNets. Tap i > 0 is the output of stage i.
    """

    def __init__(
        self,
        widths: Sequence[int],
        segments: Sequence[int],
        layers_per_stage: int | Sequence[int] = 1,
        stem: str = "cifar",
        stem_width: int = 64,
        projection: bool = True,
        pool: str = "before",
        head_width: int | None = None,
        num_classes: int = 10,
        in_chans: int = 3,
        update: str = "gradual",
        impl: str | None = None,
        drop_rate: float = 0.0,
        zero_init_last: bool = False,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        # Hydra hands over ListConfigs; plain tuples keep repr, pickling and comparisons simple.
        widths = tuple(int(w) for w in widths)
        segments = tuple(int(k) for k in segments)
        if isinstance(layers_per_stage, int):
            layers = (layers_per_stage,) * len(widths)
        else:
            layers = tuple(int(n) for n in layers_per_stage)
        _check_architecture(widths, segments, layers, stem, pool)
        check_channels("Gunn", in_chans=in_chans, stem_width=stem_width, head_width=head_width)

        self.in_chans = in_chans
        self.stem = _stem(stem, in_chans, stem_width)
        layer_kwargs = {} if impl is None else {"impl": impl}
        stages = []
        in_width = stem_width
        # Feature taps: see the class docstring. `stride` is the input's reduction so far.
        stride = 1 if stem == "cifar" else 2
        self.feature_info = [
            {"num_chs": stem_width, "reduction": stride, "module": _tap_name("stem", self.stem)}
        ]
        stride *= 1 if stem == "cifar" else 2  # the ImageNet stem's max pool
        for s, (width, k, n) in enumerate(zip(widths, segments, layers, strict=True)):
            parts: OrderedDict[str, nn.Module] = OrderedDict(
                transition=conv_bn_relu(in_width, width)
            )
            if pool == "before" and s > 0:
                parts["pool"] = nn.AvgPool2d(2)
                stride *= 2
            for j in range(n):
                parts[f"gunn{j + 1}"] = GunnLayer(width, k, projection, update, **layer_kwargs)
            if pool == "after" and s < len(widths) - 1:
                parts["pool"] = nn.AvgPool2d(2)
            stage = nn.Sequential(parts)
            self.feature_info.append(
                {"num_chs": width, "reduction": stride, "module": _tap_name(f"stages.{s}", stage)}
            )
            stride *= 2 if "pool" in parts and pool == "after" else 1
            stages.append(stage)
            in_width = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Identity() if head_width is None else conv_bn_relu(in_width, head_width)
        self._build_head(head_width or in_width, num_classes, drop_rate, global_pool)
        init_weights(self, zero_init_last)

    def gunn_layers(self) -> Iterator[GunnLayer]:
        """The GUNN layers in forward order (for switching implementations, profiling, ...)."""
        return (m for m in self.modules() if isinstance(m, GunnLayer))


def _stem(kind: str, in_chans: int, width: int) -> nn.Sequential:
    if kind == "cifar":
        return conv_bn_relu(in_chans, width, kernel=3)
    return nn.Sequential(
        *conv_bn_relu(in_chans, width, kernel=7, stride=2),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def _check_architecture(
    widths: tuple[int, ...],
    segments: tuple[int, ...],
    layers: tuple[int, ...],
    stem: str,
    pool: str,
) -> None:
    """Fail early, naming the offending values, instead of deep inside a layer constructor."""
    if not widths:
        raise ValueError("Gunn: widths must name at least one stage.")
    if not len(widths) == len(segments) == len(layers):
        raise ValueError(
            f"Gunn: widths={list(widths)}, segments={list(segments)} and "
            f"layers_per_stage={list(layers)} must have one entry per stage."
        )
    for s, (w, k, n) in enumerate(zip(widths, segments, layers, strict=True), start=1):
        if k < 1 or w % k:
            raise ValueError(
                f"Gunn: stage {s}: width {w} is not divisible by segments {k}; choose segments "
                f"among the divisors of {w} (nearest: {divisors_near(w, k)}) or another width."
            )
        if n < 1:
            raise ValueError(f"Gunn: stage {s}: layers_per_stage must be >= 1, got {n}.")
    if stem not in STEMS:
        raise ValueError(f"Gunn: stem={stem!r} is not one of {STEMS}.")
    if pool not in POOLS:
        raise ValueError(f"Gunn: pool={pool!r} is not one of {POOLS}.")


def check_channels(owner: str, **channels: int | None) -> None:
    """Channel counts of 0 or less build a network of empty tensors that fails, if at all, far
    from here; None is an unset option."""
    for key, value in channels.items():
        if value is not None and value < 1:
            raise ValueError(f"{owner}: {key}={value} must be a positive number of channels.")


class GunnTracer(torch.fx.Tracer):
    """torch.fx tracer that keeps each `GunnLayer` as one call (a leaf), so the traced graph
    runs the layer's own (fast) implementation; plain `torch.fx.symbolic_trace` instead traces
    through it and records the sequential rule (`reference_update`), the same function. timm's
    FX feature extraction gets the leaf rule from `gunn_exp.timm`."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GunnLayer) or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """`torch.fx.symbolic_trace` with GUNN layers as leaves (see `GunnTracer`)."""
    graph = GunnTracer().trace(model)
    return torch.fx.GraphModule(model, graph, type(model).__name__)


__all__ = [
    "Gunn",
    "GunnTracer",
    "ImageClassifier",
    "conv_bn_relu",
    "GlobalPool",
    "init_weights",
    "symbolic_trace",
]
