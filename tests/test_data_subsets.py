"""What the singularity probe and the harder ablation setting read from the data modules: a fixed
fraction of the training images (`data.train_fraction`) and the training images without
augmentation (`unaugmented_train_set`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from gunn_exp.data import CIFARDataModule, DigitsDataModule
from gunn_exp.data.transforms import cifar_eval_transform


def test_digits_train_fraction_is_a_fixed_stratified_subset() -> None:
    full = DigitsDataModule(num_classes=10)
    full.setup()
    part = DigitsDataModule(num_classes=10, train_fraction=0.1)
    part.setup()
    again = DigitsDataModule(num_classes=10, train_fraction=0.1)
    again.setup()
    n_full, n_part = len(full.train_set), len(part.train_set)
    assert round(0.1 * n_full) - 1 <= n_part <= round(0.1 * n_full) + 1
    assert torch.equal(part.train_set.tensors[1], again.train_set.tensors[1])  # fixed
    per_class = Counter(part.train_set.tensors[1].tolist())
    assert len(per_class) == 10 and max(per_class.values()) - min(per_class.values()) <= 1
    assert len(part.val_set) == len(full.val_set) and len(part.test_set) == len(full.test_set)
    assert part.unaugmented_train_set() is part.train_set  # digits are not augmented


def test_cifar_train_fraction_and_its_unaugmented_images(cifar_root: Path) -> None:
    data = CIFARDataModule(
        data_dir=str(cifar_root), download=False, verify_checksums=False, train_fraction=0.5
    )
    data.setup()
    assert len(data.train_set) == 20  # half of the 40 training images
    plain = data.unaugmented_train_set()
    assert plain.indices == data.train_set.indices  # the same images ...
    raw = data.train_set.dataset.data[plain.indices[0]]
    expected = cifar_eval_transform("cifar10")(raw)
    assert torch.equal(plain[0][0], expected)  # ... as the evaluation pipeline sees them,
    assert data.train_set.dataset.transform is not plain.dataset.transform  # training augments
