"""How an image file becomes a model input: recorded per run so inference needs no dataset.

Training pipelines live in the DataModules and some of their numbers exist only after `setup()`
(digits normalises with its training split's statistics). `train(cfg)` therefore writes the
evaluation preprocessing of its data to `<run>/preprocessing.json`; classify, features and export
read it back, and an exported model ships the same file, so any runtime can reproduce it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from gunn_exp.data import DigitsDataModule, ImageDataModule, ImageNetDataModule
from gunn_exp.data.transforms import IMAGENET_EVAL_INTERPOLATION
from gunn_exp.rundir.files import PREPROCESSING, write_json

# Pillow's modes for 16-bit grey pixels (16-bit colour PNGs are already read as 8-bit "RGB").
_GREY_16 = ("I;16", "I;16B", "I;16L", "I;16N")


def to_8bit(img: Image.Image, path: str | Path = "image") -> Image.Image:
    """`img` with 8-bit pixels, as the models were trained on.

    Pillow's own convert() clips 16-bit grey values to 255 (a 16-bit PNG turns almost white), so
    they are scaled: v * 255 / 65535, rounded, which gives back exactly the 8-bit picture that was
    widened to 16 bits (v * 257). 32-bit integer or float pixels (mode I, F: TIFF, some PNGs) have
    no agreed range, so they are refused rather than guessed.
    """
    if img.mode in _GREY_16:
        wide = np.asarray(img, dtype=np.uint32)
        return Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # mode L
    if img.mode in ("I", "F"):
        raise ValueError(
            f"{path}: {img.mode!r} pixels (32-bit integer or float) have no fixed range to map to "
            f"8 bits; save it as an 8- or 16-bit PNG or a JPEG."
        )
    return img


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation pipeline of one dataset, as plain numbers.

    Steps: read the file as `color` ("RGB", or "L" for one grey channel), resize its shorter side
    to `resize` pixels (`interpolation`), centre-crop `crop` x `crop`, scale pixels to [0, 1],
    subtract `mean` and divide by `std` per channel, and repeat a grey channel `in_chans` times.
    For CIFAR and digits `resize == crop` (images of the training size pass unchanged); for
    ImageNet it is the usual 256/224 resize before the centre crop, bicubic as the authors'.
    Files written before `interpolation` was recorded read back as bilinear, as they were made.
    """

    dataset: str
    color: str
    resize: int
    crop: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    interpolation: str = "bilinear"  # a torchvision InterpolationMode value

    @classmethod
    def from_datamodule(cls, dm: ImageDataModule) -> Preprocessing:
        """The pipeline of `dm`'s test split (call after `setup()`: digits' statistics need it)."""
        size = dm.image_size
        # Same resize as imagenet_eval_transform; other datasets are stored at their input size.
        imagenet = isinstance(dm, ImageNetDataModule)
        resize = round(size * 256 / 224) if imagenet else size
        # Digits are grey images replicated to in_chans channels, normalised with one mean/std.
        grey = isinstance(dm, DigitsDataModule)
        return cls(
            dataset=dm.name,
            color="L" if grey else "RGB",
            resize=resize,
            crop=size,
            mean=tuple(dm.mean[:1] if grey else dm.mean),
            std=tuple(dm.std[:1] if grey else dm.std),
            in_chans=dm.in_chans,
            interpolation=IMAGENET_EVAL_INTERPOLATION.value if imagenet else "bilinear",
        )

    @cached_property
    def _pipeline(self) -> T.Compose:
        return T.Compose(
            [
                T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation)),
                T.CenterCrop(self.crop),
                T.ToTensor(),
                T.Normalize(self.mean, self.std),
            ]
        )

    def __call__(self, img: Image.Image) -> Tensor:
        """PIL image -> normalised `in_chans` x crop x crop float tensor."""
        x = self._pipeline(img.convert(self.color))
        return x.expand(self.in_chans, -1, -1) if x.shape[0] == 1 else x

    def load(self, path: str | Path) -> Tensor:
        """Read and preprocess one image file (PIL errors propagate: the caller reports them)."""
        with Image.open(path) as img:
            return self(to_8bit(img, path))

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / PREPROCESSING, self.to_dict(), sort_keys=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Preprocessing:
        return cls(**{**fields, "mean": tuple(fields["mean"]), "std": tuple(fields["std"])})

    @classmethod
    def read(cls, folder: str | Path) -> Preprocessing:
        return cls.from_dict(json.loads((Path(folder) / PREPROCESSING).read_text()))
