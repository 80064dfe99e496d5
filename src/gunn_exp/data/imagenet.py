"""ImageNet-1k from an ImageFolder tree, with the fb.resnet.torch pipeline (SPEC §3)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Literal

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from gunn_exp.data.base import DataError, ImageDataModule, check_data_dir
from gunn_exp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_transform,
    imagenet_train_transform,
)


def load_rgb(path: str) -> Image.Image:
    """torchvision's PIL loader, but a file that cannot be decoded (corrupt, truncated, not an
    image) stops the run with a DataError naming it, rather than a PIL traceback without the name.

    Stop, not skip: a silently smaller dataset changes the experiment, and torchvision's ImageFolder
    users expect a bad file to stop the loader. Module-level so DataLoader workers can pickle it.
    """
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as err:  # UnidentifiedImageError, "image file is truncated", ...
        raise DataError(
            f"{path} cannot be decoded as an image ({type(err).__name__}: {err}). Fix: replace it "
            f"with a good copy (re-extract it from the archive) or delete it; "
            f"data.check_images=all decodes every image before training."
        ) from err


class ImageNetDataModule(ImageDataModule):
    """Reads `data_dir/train/<class>/*` and `data_dir/val/<class>/*` (the usual ILSVRC-2012 layout
    with the validation images moved into class folders). The paper evaluated on val.

    The tree is checked in `setup()` before any training: both splits hold the same classes, none
    empty, as many as `num_classes`, and `check_images` files of each split decode (a fixed random
    sample; `all`: every file, slow on 1.28M images; 0: none). A file that fails later, in the
    loader, stops the run naming it (`load_rgb`).
    """

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        ten_crop: bool = False,
        name: str = "imagenet",
        check_images: int | Literal["all"] = 200,
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        if check_images != "all" and not (isinstance(check_images, int) and check_images >= 0):
            raise DataError(
                f"data.check_images={check_images!r} is invalid: expected an integer >= 0 or all."
            )
        self.data_dir = Path(data_dir)
        self.ten_crop = ten_crop
        self.check_images = check_images

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            self._check_split(split)

    def _check_split(self, split: str) -> Path:
        check_data_dir(self.data_dir)
        folder = self.data_dir / split
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise DataError(
                f"imagenet: {folder} is missing or has no class folders. ImageNet cannot be "
                f"downloaded automatically (it needs an account at image-net.org). Fix: put "
                f"ILSVRC-2012 at {self.data_dir} as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                f"(e.g. with the valprep.sh script), or set data.data_dir=<folder>."
            )
        return folder

    def _image_folder(self, split: str, transform: object) -> ImageFolder:
        """The split as an ImageFolder; an empty class folder is named (torchvision's own error
        lists every class)."""
        folder = self._check_split(split)
        dataset = ImageFolder(str(folder), transform=transform, loader=load_rgb, allow_empty=True)
        counts = Counter(dataset.targets)
        empty = [c for i, c in enumerate(dataset.classes) if counts[i] == 0]
        if empty:
            raise DataError(
                f"imagenet: {folder / empty[0]} has no image files ({len(empty)} empty class "
                f"folder(s) in {folder}; extensions read: {', '.join(IMG_EXTENSIONS)}). Fix: put "
                f"its images there, or remove the folder from train/ and val/."
            )
        return dataset

    def setup(self, stage: str | None = None) -> None:
        size = self.image_size
        train = self._image_folder("train", imagenet_train_transform(size))
        val = self._image_folder("val", imagenet_eval_transform(size, self.ten_crop))
        for here, there, a, b in (("train", "val", train, val), ("val", "train", val, train)):
            only = sorted(set(a.classes) - set(b.classes))
            if only:
                raise DataError(
                    f"imagenet: class {only[0]} is in {self.data_dir / here} but not in "
                    f"{self.data_dir / there} ({len(only)} such class(es)). Fix: add its "
                    f"{there} images, or remove it from {here}/: both splits need the same classes."
                )
        if len(train.classes) != self.num_classes:
            raise DataError(
                f"imagenet: {self.data_dir} has {len(train.classes)} classes but "
                f"data.num_classes={self.num_classes}; set data.num_classes={len(train.classes)}."
            )
        for dataset in (train, val):
            _check_sample(dataset, self.check_images)
        self.classes = train.classes
        self.train_set, self.val_set, self.test_set = train, val, val


def _check_sample(dataset: ImageFolder, count: int | Literal["all"]) -> None:
    """Decode `count` files of `dataset` (a fixed random sample) or all of them; the first that
    fails raises load_rgb's DataError, before any training step."""
    paths = [path for path, _ in dataset.samples]
    if count != "all" and count < len(paths):
        paths = random.Random(0).sample(paths, count)
    for path in paths:
        load_rgb(path)
