"""scikit-learn's bundled handwritten digits: a real, tiny, offline dataset for demos and tests."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset

from gunn_exp.data.base import ImageDataModule


class DigitsDataModule(ImageDataModule):
    """1,797 8x8 grey digits (0-16), split once into stratified train/val/test by `split_seed`.

    Images are scaled to [0, 1], bilinearly upscaled to `image_size`, replicated to `in_chans`
    channels (3 by default, so a model trained here can be fine-tuned on RGB data) and normalised
    with the training split's mean and std. `train_fraction` < 1 trains on a stratified subset
    of the training split (fixed by `split_seed`; validation and test stay whole): a harder
    setting in which accuracy does not saturate.
    """

    name = "digits"
    default_num_classes = 10

    def __init__(
        self,
        split_seed: int = 0,  # fixes the split, whatever the run's seed
        val_fraction: float = 0.15,  # of all 1,797 images, stratified by class
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not (
            0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1
        ):
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                f"in (0, 1) and sum to less than 1."
            )
        if not 0 < train_fraction <= 1:
            raise ValueError(f"data.train_fraction={train_fraction} must be in (0, 1].")
        _check_split_sizes(val_fraction, test_fraction, train_fraction)
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def check(self) -> None:
        self.check_class_count(10)

    def setup(self, stage: str | None = None) -> None:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.tensor(digits.target, dtype=torch.long)
        idx = list(range(len(labels)))
        rest, test = train_test_split(
            idx, test_size=self.test_fraction, stratify=digits.target, random_state=self.split_seed
        )
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=digits.target[rest],
            random_state=self.split_seed,
        )
        if self.train_fraction < 1:
            train, _ = train_test_split(
                train,
                train_size=self.train_fraction,
                stratify=digits.target[train],
                random_state=self.split_seed,
            )
        images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        images = images.expand(-1, self.in_chans, -1, -1)
        mean, std = images[train].mean().item(), images[train].std().item()
        self.mean, self.std = (mean,) * self.in_chans, (std,) * self.in_chans
        images = ((images - mean) / std).contiguous()
        self.classes = [str(c) for c in digits.target_names]
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])


IMAGES, CLASSES = 1797, 10  # sklearn's digits


def _check_split_sizes(val_fraction: float, test_fraction: float, train_fraction: float) -> None:
    """A stratified split needs one image of each class on both of its sides: refuse fractions
    that leave fewer (sklearn would fail during setup, naming neither key nor fix). The sizes
    follow sklearn's rounding: the `test_size` side is ceil(f * n), a `train_size` side floor."""
    test = math.ceil(test_fraction * IMAGES)
    rest = IMAGES - test
    val = math.ceil(val_fraction / (1 - test_fraction) * rest)
    train = rest - val
    kept = math.floor(train_fraction * train) if train_fraction < 1 else train
    for name, count in (
        ("test images", test),
        ("validation images", val),
        ("training images", kept),
        (
            "training images left out by data.train_fraction",
            train - kept if kept < train else CLASSES,
        ),
        ("images left for training", train),
    ):
        if count < CLASSES:
            raise ValueError(
                f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction} and "
                f"data.train_fraction={train_fraction} give {count} {name}; a stratified split "
                f"needs at least {CLASSES} (one per class) of the {IMAGES} digits."
            )
