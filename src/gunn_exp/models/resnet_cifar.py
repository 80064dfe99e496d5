"""CIFAR ResNet-18: the usual benchmark yardstick for GUNN's speed and accuracy.

The widespread CIFAR variant of He et al.'s ResNet-18: a 3x3 stride-1 stem without max pooling,
BasicBlocks [2, 2, 2, 2] of widths 64, 128, 256, 512 (stride 2 from the second stage on), global
average pooling and a linear classifier. It exposes the same model API as `Gunn` and is
registered as `resnet18_cifar`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from gunn_exp.models.gunn import ImageClassifier, check_channels, conv_bn_relu, init_weights
from gunn_exp.models.pretrained import cifar_cfgs
from gunn_exp.models.registry import build_fixed, register_model


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN with an identity (or 1x1 Conv-BN when the shape changes) shortcut."""

    def __init__(self, in_chans: int, out_chans: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        # A module, as torchvision's, so that gunnify (models/gunnify.py) finds the activation.
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_chans != out_chans:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_chans, out_chans, 1, stride, bias=False), nn.BatchNorm2d(out_chans)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + self.shortcut(x))


class ResNetCifar(ImageClassifier):
    """ResNet with BasicBlocks and a CIFAR stem; `blocks` and `widths` give the stages.
    `zero_init_last`: the gamma of each block's last BatchNorm starts at 0 (timm's option)."""

    def __init__(
        self,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        check_channels(
            "ResNetCifar", in_chans=in_chans, **{f"widths[{i}]": w for i, w in enumerate(widths)}
        )
        self.in_chans = in_chans
        self.stem = conv_bn_relu(in_chans, widths[0], kernel=3)
        # Feature taps: the stem's output, then each stage's (stride 1, 1, 2, 4, 8).
        self.feature_info = [{"num_chs": widths[0], "reduction": 1, "module": "stem"}]
        stages = []
        in_width = widths[0]
        for s, (n, width) in enumerate(zip(blocks, widths, strict=True)):
            strides = [1 if s == 0 else 2] + [1] * (n - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(in_width, width, stride))
                in_width = width
            stages.append(nn.Sequential(*stage))
            self.feature_info.append({"num_chs": width, "reduction": 2**s, "module": f"stages.{s}"})
        self.stages = nn.Sequential(*stages)
        self.head = nn.Identity()
        self._build_head(in_width, num_classes, drop_rate, global_pool)
        init_weights(self)
        if zero_init_last:  # timm's ResNet option: each block starts as its shortcut
            for block in self.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)


# How to build a CIFAR ResNet of another architecture than a named one's.
OWN_RESNET = "build ResNetCifar(blocks=..., widths=...) from gunn_exp.models.resnet_cifar"


@register_model(cfgs=cifar_cfgs(pool_size=(4, 4)))
def resnet18_cifar(**options: Any) -> ResNetCifar:
    """CIFAR ResNet-18 (3x3 stem, no max pool): a yardstick for benchmarks, not a GUNN."""
    return ResNetCifar(**options)


@register_model(cfgs=cifar_cfgs(pool_size=(8, 8)))
def resnet_mini(**options: Any) -> ResNetCifar:
    """Compact CIFAR ResNet for CPU ablations (ResNet vs gunnified ResNet): He et al.'s CIFAR
    skeleton with n=2 (3 stages of 2 BasicBlocks, widths 16/32/64) and 1x1-conv shortcuts.
    175,258 parameters with 10 classes."""
    architecture = {"blocks": (2, 2, 2), "widths": (16, 32, 64)}
    return build_fixed("resnet_mini", ResNetCifar, architecture, options, OWN_RESNET)
