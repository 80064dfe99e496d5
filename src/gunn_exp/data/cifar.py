"""CIFAR-10/100 from torchvision's python-pickle files, with the authors' pipeline
(docs/SPEC.md §3)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from gunn_exp.data.base import DataError, ImageDataModule, check_data_dir
from gunn_exp.data.device_loader import DeviceLoader
from gunn_exp.data.transforms import cifar_eval_transform, cifar_stats, cifar_train_transform


class _UncheckedCIFAR10(CIFAR10):
    """CIFAR-10 that only checks that its files exist (no md5): re-packed copies, test fixtures."""

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        with (Path(self.root) / self.base_folder / self.meta["filename"]).open("rb") as f:
            self.classes = pickle.load(f, encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _UncheckedCIFAR100(_UncheckedCIFAR10, CIFAR100):
    pass


def _first_bad_file(
    cls: type[CIFAR10], folder: Path, verify_checksums: bool
) -> tuple[Path, str] | None:
    """(file, what is wrong) for the first batch or meta file that is missing, fails its md5
    (`verify_checksums`) or is not a readable CIFAR pickle; None when all look right.

    check() runs it before a run that will not download (about a second for the real files);
    after a failed load it names the culprit.
    """
    labels_key = "labels" if cls.meta["filename"] == "batches.meta" else "fine_labels"
    files = [(name, md5, True) for name, md5 in cls.train_list + cls.test_list]
    files.append((cls.meta["filename"], cls.meta["md5"], False))
    for name, md5, is_batch in files:
        path = folder / name
        if not path.is_file():
            return path, "missing"
        if verify_checksums and not check_integrity(str(path), md5):
            why = "its md5 is not the published one; data.verify_checksums=false accepts copies"
            return path, f"corrupt ({why})"
        try:
            with path.open("rb") as f:
                entry: Any = pickle.load(f, encoding="latin1")
        except Exception as err:  # truncated or random bytes: EOFError, UnpicklingError, ...
            return path, f"corrupt (cannot be unpickled: {type(err).__name__}: {err})"
        key = labels_key if is_batch else cls.meta["key"]
        if not isinstance(entry, dict) or key not in entry:
            return path, f"corrupt (not a CIFAR {'batch' if is_batch else 'meta'} file: no {key!r})"
        if is_batch:
            data = entry.get("data")
            rows = data.shape[0] if isinstance(data, np.ndarray) and data.ndim == 2 else None
            if rows is None or data.shape[1] != 3 * 32 * 32 or rows != len(entry[key]):
                return path, "corrupt (its 'data' is not N rows of 3x32x32 values with N labels)"
    return None


_CLASSES = {"cifar10": 10, "cifar100": 100}
_UNCHECKED = {"cifar10": _UncheckedCIFAR10, "cifar100": _UncheckedCIFAR100}

_DATASETS = {
    "cifar10": (
        CIFAR10,
        "cifar-10-batches-py",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        CIFAR100,
        "cifar-100-python",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


class CIFARDataModule(ImageDataModule):
    """CIFAR-10 or CIFAR-100 (`name`), downloaded into `data_dir` when missing and `download`.

    `on_device=True` keeps the training images on the run's device and augments each batch there
    (`DeviceLoader`): no DataLoader workers, no host-to-device copies; the fast path on a GPU.
    The paper validated on the test set; `val_size > 0` holds out that many training images
    (a fixed, seeded split) for honest model selection instead. `train_fraction` < 1 trains on
    that fraction of the (remaining) training images, a fixed choice: a harder setting.
    """

    def __init__(
        self,
        name: str = "cifar10",
        data_dir: str = "data",
        download: bool = True,
        jigsaw: bool = True,
        val_size: int = 0,
        verify_checksums: bool = True,
        on_device: bool = False,
        num_classes: int | None = None,  # None: the dataset's (10 or 100)
        train_fraction: float = 1.0,
        **kwargs,
    ) -> None:
        if name not in _DATASETS:
            raise ValueError(f"data.name={name!r}: CIFARDataModule knows {sorted(_DATASETS)}.")
        self.default_num_classes = 100 if name == "cifar100" else 10
        super().__init__(num_classes=num_classes, name=name, **kwargs)
        if val_size < 0:
            raise ValueError(f"data.val_size={val_size} must be >= 0.")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"data.train_fraction={train_fraction} must be in (0, 1].")
        self.train_fraction = train_fraction
        self.data_dir = Path(data_dir)
        self.download = download
        self.jigsaw = jigsaw
        self.val_size = val_size
        self.verify_checksums = verify_checksums
        self.on_device = on_device
        self.mean, self.std = cifar_stats(name)

    @property
    def _dataset_class(self) -> type[CIFAR10]:
        return _DATASETS[self.name][0] if self.verify_checksums else _UNCHECKED[self.name]

    def check(self) -> None:
        """The folder and every batch file, unless `download` (then prepare_data fetches what is
        missing or fails its md5)."""
        self._check_settings()
        _, folder, _ = _DATASETS[self.name]
        if not self.download and (
            not (self.data_dir / folder).is_dir()
            or _first_bad_file(self._dataset_class, self.data_dir / folder, self.verify_checksums)
        ):
            raise self._data_error(FileNotFoundError(self.data_dir / folder))

    def _check_settings(self) -> None:
        """What every entry (check, prepare_data, setup) refuses first: a data_dir under a file,
        a class count that is not the dataset's."""
        check_data_dir(self.data_dir, "paths.data_dir")
        self.check_class_count(_CLASSES[self.name])

    def prepare_data(self) -> None:
        self._check_settings()
        try:
            for train in (True, False):
                self._dataset_class(self.data_dir, train=train, download=self.download)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError variously
            raise self._data_error(err) from err

    def setup(self, stage: str | None = None) -> None:
        self._check_settings()
        try:
            self._setup()
        except DataError:
            raise
        except Exception as err:  # setup() without prepare_data() (eval.py, DDP ranks > 0)
            raise self._data_error(err) from err

    def _setup(self) -> None:
        cls = self._dataset_class
        train = cls(
            self.data_dir, train=True, transform=cifar_train_transform(self.name, self.jigsaw)
        )
        test = cls(self.data_dir, train=False, transform=cifar_eval_transform(self.name))
        self.classes = list(train.classes)
        self.train_set, self.val_set, self.test_set = train, test, test
        if self.val_size or self.train_fraction < 1:
            # One fixed order: the first val_size images held out for validation (same images,
            # the evaluation transform), the first train_fraction of the rest trained on.
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
            rest = order[self.val_size :]
            self.train_set = Subset(train, rest[: max(1, round(self.train_fraction * len(rest)))])
            if self.val_size:
                self.val_set = Subset(self._unaugmented(train), order[: self.val_size])

    def _unaugmented(self, dataset: CIFAR10) -> CIFAR10:
        """The same images (shared, not reloaded) with the evaluation transform."""
        plain = copy.copy(dataset)
        plain.transform = cifar_eval_transform(self.name)
        return plain

    def unaugmented_train_set(self) -> CIFAR10 | Subset:
        train = super().unaugmented_train_set()
        if isinstance(train, Subset):
            return Subset(self._unaugmented(train.dataset), train.indices)
        return self._unaugmented(train)

    def _data_error(self, err: Exception) -> DataError:
        """One line for a failed load: which file is missing or corrupt when the folder is there
        (a damaged extraction), else that the dataset is not in `data_dir`; both with the fix."""
        _, folder, url = _DATASETS[self.name]
        folder = self.data_dir / folder
        download = f"data.download=true failed: {err}" if self.download else "data.download=false"
        if not folder.is_dir():
            return DataError(
                f"{self.name}: the dataset is not in {folder} ({download}). Fix: download {url} "
                f"and extract it into {self.data_dir} (so that {folder} holds the batch files), "
                f"or point paths.data_dir at a folder that has it."
            )
        refetch = (
            f"Fix: delete {folder} and run again with data.download=true to fetch {url} again "
            f"(or extract that archive into {self.data_dir} yourself)."
        )
        bad = _first_bad_file(self._dataset_class, folder, self.verify_checksums)
        if bad is None:  # every file reads: say what failed rather than guess
            return DataError(f"{self.name}: {folder} could not be loaded ({err}). {refetch}")
        path, why = bad
        return DataError(f"{self.name}: {path} is {why}. {refetch}")

    def train_dataloader(self) -> DataLoader | DeviceLoader:
        if not self.on_device:
            return super().train_dataloader()
        subset = self.train_set if isinstance(self.train_set, Subset) else None
        base = subset.dataset if subset is not None else self.train_set
        index = subset.indices if subset is not None else slice(None)
        images = torch.from_numpy(base.data[index]).permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW
        labels = torch.tensor(base.targets)[index]
        trainer = self.trainer
        return DeviceLoader(
            images,
            labels,
            batch_size=self.per_device_batch_size,
            mean=self.mean,
            std=self.std,
            device=trainer.strategy.root_device,
            jigsaw=self.jigsaw,
            seed=torch.initial_seed() % 2**31,  # the run's seed after seed_everything
            rank=trainer.global_rank,
            world_size=trainer.world_size,
        )
