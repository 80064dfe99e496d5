"""The GUNN network (SPEC §2): a stem, stages of [transition, GUNN layers, pooling], a head.

The constructor's arguments are the architecture (as in torchvision's resnet.py): every paper model
is one call with different numbers, and a new GUNN is defined by choosing new numbers (in Python or
in a Hydra YAML through the registry's generic `gunn` builder).

The model API follows timm so that training, evaluation and benchmark code treat every model alike:
`forward_features` (unpooled feature map), `forward_head`, `reset_classifier`, `num_features`,
`num_classes`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from gunn_exp.models.layer import GunnLayer, GunnUnit

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
    """SPEC §2 init: convs kaiming normal (fan_out, relu); BN weight 1, bias 0; Linear bias 0.

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


class ImageClassifier(nn.Module):
    """Shared head and timm-style API: subclasses build a trunk and define `forward_features`.

    `_build_head` adds global average pooling (adaptive, so any input size works), dropout and a
    Linear classifier; `num_features` is the width the trunk ends with.
    """

    num_features: int
    num_classes: int

    def _build_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        self.num_features = num_features
        self.drop_rate = drop_rate
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one (0: none, return the features)."""
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Identity()
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch -> unpooled feature map with `num_features` channels."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> logits (or the pooled, dropped-out features when pre_logits)."""
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


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
        update: "gradual" (GUNN) or "simultaneous" (the SUNN ablation, SPEC §1).
        impl: GUNN layer implementation; None uses GunnLayer's default.
        drop_rate: dropout probability before the classifier.
        zero_init_last: start every segment function G_i at 0 (gamma of its last BatchNorms 0),
            a deviation from the authors' init (all gammas 1), which stays the default.
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

        self.stem = _stem(stem, in_chans, stem_width)
        layer_kwargs = {} if impl is None else {"impl": impl}
        stages = []
        in_width = stem_width
        for s, (width, k, n) in enumerate(zip(widths, segments, layers, strict=True)):
            parts: OrderedDict[str, nn.Module] = OrderedDict(
                transition=conv_bn_relu(in_width, width)
            )
            if pool == "before" and s > 0:
                parts["pool"] = nn.AvgPool2d(2)
            for j in range(n):
                parts[f"gunn{j + 1}"] = GunnLayer(width, k, projection, update, **layer_kwargs)
            if pool == "after" and s < len(widths) - 1:
                parts["pool"] = nn.AvgPool2d(2)
            stages.append(nn.Sequential(parts))
            in_width = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Identity() if head_width is None else conv_bn_relu(in_width, head_width)
        self._build_head(head_width or in_width, num_classes, drop_rate)
        init_weights(self, zero_init_last)

    def gunn_layers(self) -> Iterator[GunnLayer]:
        """The GUNN layers in forward order (for switching implementations, profiling, ...)."""
        return (m for m in self.modules() if isinstance(m, GunnLayer))

    def forward_features(self, x: Tensor) -> Tensor:
        """Image batch -> unpooled feature map with `num_features` channels."""
        return self.head(self.stages(self.stem(x)))


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
            raise ValueError(f"Gunn: stage {s}: width {w} is not divisible by segments {k}.")
        if n < 1:
            raise ValueError(f"Gunn: stage {s}: layers_per_stage must be >= 1, got {n}.")
    if stem not in STEMS:
        raise ValueError(f"Gunn: stem={stem!r} is not one of {STEMS}.")
    if pool not in POOLS:
        raise ValueError(f"Gunn: pool={pool!r} is not one of {POOLS}.")


__all__ = ["Gunn", "ImageClassifier", "conv_bn_relu", "init_weights"]
