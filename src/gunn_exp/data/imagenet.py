"""ImageNet-1k from an ImageFolder tree, with the fb.resnet.torch pipeline (docs/SPEC.md §3)."""

from __future__ import annotations

import copy
import random
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

    `check()` (run by train.py in every process before the Trainer starts, and by prepare_data)
    refuses a bad tree: both splits must hold the same classes, none empty, as many as
    `num_classes`, and `check_images` files of each split must decode (a fixed random sample;
    `all`: every file, slow on 1.28M images; 0: none). A file that fails later, in the loader,
    stops the run naming it (`load_rgb`).
    """

    name = "imagenet"
    default_num_classes = 1000  # ILSVRC-2012

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        ten_crop: bool = False,
        check_images: int | Literal["all"] = 200,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if check_images != "all" and not (isinstance(check_images, int) and check_images >= 0):
            raise DataError(
                f"data.check_images={check_images!r} is invalid: expected an integer >= 0 or all."
            )
        self.data_dir = Path(data_dir)
        self.ten_crop = ten_crop
        self.check_images = check_images
        self._checked = False

    def prepare_data(self) -> None:
        if not self._checked:  # train.py has run check() already in this process
            self.check()

    def check(self) -> None:
        """The tree without a full scan (cheap for 1.28M files): class folders with images, the
        same in both splits, `num_classes` of them, and a sample of files that decodes."""
        classes = {split: self._class_folders(split) for split in ("train", "val")}
        for here, there in (("train", "val"), ("val", "train")):
            only = sorted(set(classes[here]) - set(classes[there]))
            if only:
                raise DataError(
                    f"imagenet: class {only[0]} is in {self.data_dir / here} but not in "
                    f"{self.data_dir / there} ({len(only)} such class(es)). Fix: add its "
                    f"{there} images, or remove it from {here}/: both splits need the same classes."
                )
        self.check_class_count(len(classes["train"]), str(self.data_dir))
        for folders in classes.values():
            _check_sample(list(folders.values()), self.check_images)
        self._checked = True

    def _class_folders(self, split: str) -> dict[str, Path]:
        check_data_dir(self.data_dir)
        folder = self.data_dir / split
        found = {p.name: p for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else {}
        if not found:
            raise DataError(
                f"imagenet: {folder} is missing or has no class folders. ImageNet cannot be "
                f"downloaded automatically (it needs an account at image-net.org). Fix: put "
                f"ILSVRC-2012 at {self.data_dir} as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                f"(e.g. with the valprep.sh script), or set data.data_dir=<folder>."
            )
        for class_folder in found.values():  # any(): stops at the first image of each class
            if not any(_is_image(f) for f in class_folder.iterdir()):
                raise DataError(
                    f"imagenet: {class_folder} has no image files (extensions read: "
                    f"{', '.join(IMG_EXTENSIONS)}). Fix: put its images there, or remove the "
                    f"class from train/ and val/."
                )
        return dict(sorted(found.items()))

    def setup(self, stage: str | None = None) -> None:
        size = self.image_size
        # Checked by check() (train.py) or prepare_data() (eval.py): here only the full listing.
        train = ImageFolder(
            str(self.data_dir / "train"), imagenet_train_transform(size), loader=load_rgb
        )
        val = ImageFolder(
            str(self.data_dir / "val"),
            imagenet_eval_transform(size, self.ten_crop),
            loader=load_rgb,
        )
        self.classes = train.classes
        self.train_set, self.val_set, self.test_set = train, val, val

    def unaugmented_train_set(self) -> ImageFolder:
        """The training images with one centre crop (the evaluation transform), not re-listed."""
        plain = copy.copy(super().unaugmented_train_set())
        plain.transform = imagenet_eval_transform(self.image_size, ten_crop=False)
        return plain


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS  # by name only: no stat per file


def _check_sample(class_folders: list[Path], count: int | Literal["all"]) -> None:
    """Decode `count` files (a fixed random sample, drawn class by class so that only the drawn
    classes are listed) or all of them; the first that fails raises load_rgb's DataError."""
    if count == "all":
        for folder in class_folders:
            for path in sorted(filter(_is_image, folder.iterdir())):
                load_rgb(str(path))
        return
    rng = random.Random(0)
    listed: dict[Path, list[Path]] = {}
    for _ in range(count):
        folder = rng.choice(class_folders)
        if folder not in listed:
            listed[folder] = sorted(filter(_is_image, folder.iterdir()))
        load_rgb(str(rng.choice(listed[folder])))
