"""ImageNet-1k from an ImageFolder tree, with the fb.resnet.torch pipeline (SPEC §3)."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from gunn_exp.data.base import ImageDataModule
from gunn_exp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    imagenet_eval_transform,
    imagenet_train_transform,
)


class ImageNetDataModule(ImageDataModule):
    """Reads `data_dir/train/<class>/*` and `data_dir/val/<class>/*` (the usual ILSVRC-2012 layout
    with the validation images moved into class folders). The paper evaluated on val."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        ten_crop: bool = False,
        name: str = "imagenet",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.data_dir = Path(data_dir)
        self.ten_crop = ten_crop

    def prepare_data(self) -> None:
        for split in ("train", "val"):
            folder = self.data_dir / split
            if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
                raise FileNotFoundError(
                    f"imagenet: {folder} is missing or has no class folders. ImageNet cannot be "
                    f"downloaded automatically (it needs an account at image-net.org). Fix: put "
                    f"ILSVRC-2012 at {self.data_dir} as train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
                    f"(e.g. with the valprep.sh script), or set data.data_dir=<folder>."
                )

    def setup(self, stage: str | None = None) -> None:
        size = self.image_size
        train = ImageFolder(str(self.data_dir / "train"), transform=imagenet_train_transform(size))
        val = ImageFolder(
            str(self.data_dir / "val"), transform=imagenet_eval_transform(size, self.ten_crop)
        )
        if train.classes != val.classes:
            raise ValueError(
                f"imagenet: train/ has {len(train.classes)} classes and val/ has "
                f"{len(val.classes)}; both must hold the same class folders."
            )
        if len(train.classes) != self.num_classes:
            raise ValueError(
                f"imagenet: {self.data_dir} has {len(train.classes)} classes but "
                f"data.num_classes={self.num_classes}; set data.num_classes={len(train.classes)}."
            )
        self.classes = train.classes
        self.train_set, self.val_set, self.test_set = train, val, val
