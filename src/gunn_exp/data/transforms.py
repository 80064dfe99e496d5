"""The authors' data pipelines (docs/SPEC.md §3): CIFAR with the Jigsaw shift, fb.resnet.torch
ImageNet."""

from __future__ import annotations

import math

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import functional as TF

# The normalisation lives with the models (their pretrained cfgs carry it): one definition.
from gunn_exp.models.pretrained import CIFAR_STATS, IMAGENET_MEAN, IMAGENET_STD

# The evaluation resize, as the authors' (fb.resnet.torch transforms.lua `Scale` defaults to it).
IMAGENET_EVAL_INTERPOLATION = T.InterpolationMode.BICUBIC
# AlexNet PCA lighting noise on ImageNet RGB (fb.resnet.torch).
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


def cifar_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std on the 0-1 scale for `cifar10` or `cifar100`."""
    mean, std = CIFAR_STATS[name]
    return tuple(m / 255 for m in mean), tuple(s / 255 for s in std)


class Jigsaw(torch.nn.Module):
    """The authors' cyclic shift: with p=1/3 nothing, else roll the image by d ~ U{1..size}
    along the width or the height axis (1/2 each). Works on a CHW tensor."""

    def forward(self, img: Tensor) -> Tensor:
        choice = int(torch.randint(3, ()))
        if choice == 0:
            return img
        dim = -1 if choice == 1 else -2
        shift = int(torch.randint(1, img.shape[dim] + 1, ()))
        return torch.roll(img, shifts=shift, dims=dim)


def cifar_train_transform(name: str, jigsaw: bool = True) -> T.Compose:
    """Normalise, flip, random crop 32 with 4 zero pixels of padding (after normalisation, so the
    padding is the mean colour), then the optional Jigsaw shift, in the authors' order."""
    mean, std = cifar_stats(name)
    steps: list = [
        T.ToTensor(),
        T.Normalize(mean, std),
        T.RandomHorizontalFlip(),
        T.RandomCrop(32, padding=4, fill=0),
    ]
    if jigsaw:
        steps.append(Jigsaw())
    return T.Compose(steps)


def cifar_eval_transform(name: str) -> T.Compose:
    mean, std = cifar_stats(name)
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])


class Lighting(torch.nn.Module):
    """AlexNet-style PCA colour noise on a CHW tensor in [0, 1] (fb.resnet.torch, alphastd 0.1)."""

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd
        self.register_buffer("eigval", torch.tensor(IMAGENET_EIGVAL))
        self.register_buffer("eigvec", torch.tensor(IMAGENET_EIGVEC))

    def forward(self, img: Tensor) -> Tensor:
        if self.alphastd == 0:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = self.eigvec @ (alpha * self.eigval)
        return img + rgb.view(3, 1, 1).to(img.dtype)


class RandomSizedCrop(torch.nn.Module):
    """fb.resnet.torch's RandomSizedCrop on a PIL image: up to 10 tries of a crop whose area is
    U(0.08, 1) of the image and whose aspect ratio is U(3/4, 4/3) (uniform, then w and h swapped
    with p=1/2), resized to size x size (bicubic); else resize + centre crop.

    torchvision's RandomResizedCrop draws the ratio log-uniformly and never swaps, a slightly
    different distribution; this one follows docs/SPEC.md §3.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        attempts: int = 10,
    ) -> None:
        super().__init__()
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.attempts = attempts
        self.fallback = T.Compose(
            [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
        )

    def get_params(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of a crop of a height x width image; None when every attempt missed."""
        for _ in range(self.attempts):
            area = float(torch.empty(()).uniform_(*self.scale)) * height * width
            aspect = float(torch.empty(()).uniform_(*self.ratio))
            w = round(math.sqrt(area * aspect))
            h = round(math.sqrt(area / aspect))
            if float(torch.rand(())) < 0.5:
                w, h = h, w
            if h <= height and w <= width:
                top = int(torch.randint(height - h + 1, ()))
                left = int(torch.randint(width - w + 1, ()))
                return top, left, h, w
        return None

    def forward(self, img: Image.Image) -> Image.Image:
        params = self.get_params(img.height, img.width)
        if params is None:
            return self.fallback(img)
        return TF.resized_crop(
            img, *params, [self.size, self.size], interpolation=T.InterpolationMode.BICUBIC
        )


def imagenet_train_transform(size: int = 224) -> T.Compose:
    """fb.resnet.torch: random-sized crop (bicubic), colour jitter in random order, PCA lighting,
    normalise, horizontal flip."""
    return T.Compose(
        [
            RandomSizedCrop(size),
            # torchvision's ColorJitter applies its factors in a random order, like fb.resnet.torch.
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),
            T.ToTensor(),
            Lighting(0.1),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            T.RandomHorizontalFlip(),
        ]
    )


def imagenet_eval_transform(size: int = 224, ten_crop: bool = False) -> T.Compose:
    """Resize the shorter side to size*256/224, then one centre crop (paper) or ten crops (the
    corners and the centre, and their mirror images).

    Bicubic, as the authors resized (fb.resnet.torch datasets/transforms.lua: `Scale`'s
    interpolation defaults to 'bicubic'); torchvision's default would be bilinear.
    inference.preprocessing replays this resize and must change with it.
    """
    resize = T.Resize(round(size * 256 / 224), interpolation=IMAGENET_EVAL_INTERPOLATION)
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if ten_crop:
        return T.Compose([resize, T.TenCrop(size), StackCrops(normalize)])
    return T.Compose([resize, T.CenterCrop(size), normalize])


class StackCrops(torch.nn.Module):
    """Apply `transform` to each crop of a TenCrop tuple and stack them into a 10xCxHxW tensor."""

    def __init__(self, transform: T.Compose) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, crops: tuple) -> Tensor:
        return torch.stack([self.transform(c) for c in crops])
