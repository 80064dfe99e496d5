"""Shared behaviour of the image-classification DataModules: the global batch and the loaders."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from gunn_exp.data.seeding import SeededSamples
from gunn_exp.errors import DataError


def check_data_dir(path: Path, key: str = "data.data_dir") -> None:
    """Refuse a data folder that is, or lies under, a file (a `paths.data_dir` typo), before any
    dataset code gives a less direct error. A folder that does not exist yet is fine here."""
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "" if existing == path else f" (in {key}={path})"
        keys = key if key == "paths.data_dir" else f"paths.data_dir (or {key})"
        raise DataError(
            f"{existing} is a file, not a folder{where}. Fix: set {keys} to the folder that "
            f"holds the datasets."
        )


class ImageDataModule(pl.LightningDataModule):
    """Base class: subclasses fill `train_set`, `val_set`, `test_set` and `classes` in `setup`.

    `batch_size` is the GLOBAL batch, as in the paper (64 on CIFAR split over 4 GPUs): with N
    processes each loader yields batch_size / N images, so a recipe means the same thing on any
    number of devices.
    """

    name: str = "images"
    # The dataset's class count: what num_classes=None means (a subclass's data sets it).
    default_num_classes: int | None = None
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __init__(
        self,
        num_classes: int | None = None,
        in_chans: int = 3,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        num_classes = self.default_num_classes if num_classes is None else num_classes
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"data.num_classes={num_classes!r} must be a positive integer.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size={batch_size} must be a positive integer.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0.")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        if name is not None:
            self.name = name
        self.classes: list[str] = [str(i) for i in range(num_classes)]
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # lightning-hydra-template's names for the splits, for code written against its datamodules.
    @property
    def data_train(self) -> Dataset | None:
        return self.train_set

    @property
    def data_val(self) -> Dataset | None:
        return self.val_set

    @property
    def data_test(self) -> Dataset | None:
        return self.test_set

    def check(self) -> None:
        """Cheap checks of the data on disk, raising DataError; train() runs them in every process
        before the Trainer starts, so bad data stops a run (DDP included) in one line before any
        process is launched. Downloads stay in `prepare_data`. Nothing to check by default."""

    def check_class_count(self, found: int, where: str = "") -> None:
        """`num_classes` must be the data's class count: fewer outputs than labels fail only
        inside the loss, more leave classifier rows that are never trained."""
        if found != self.num_classes:
            where = f" ({where})" if where else ""
            raise DataError(
                f"{self.name}{where} has {found} classes but data.num_classes={self.num_classes}; "
                f"set data.num_classes={found} (the model follows it)."
            )

    def unaugmented_train_set(self) -> Dataset:
        """The training images as the evaluation pipeline sees them (no random augmentation):
        what a measurement on training data reads (the singularity probe). The training set
        itself by default, for data modules that do not augment."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called.")
        return self.train_set

    @property
    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise DataError(
                f"data.batch_size={self.batch_size} (the global batch) is not divisible by the "
                f"{world} processes of this run; use a multiple of {world}."
            )
        return self.batch_size // world

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not been called.")
        return DataLoader(
            # Training samples can be seeded one by one (data/seeding.py), for exact resumes.
            SeededSamples(dataset) if train else dataset,
            batch_size=self.per_device_batch_size,
            shuffle=train,
            drop_last=train and len(dataset) >= self.per_device_batch_size,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
