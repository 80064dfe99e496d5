"""Random images and labels (torchvision FakeData): throughput benchmarks and debugging."""

from __future__ import annotations

from torchvision import transforms as T
from torchvision.datasets import FakeData

from gunn_exp.data.base import ImageDataModule


class SyntheticDataModule(ImageDataModule):
    """FakeData splits of fixed, seeded content; nothing to learn, nothing to download."""

    name = "synthetic"
    default_num_classes = 10

    def __init__(
        self,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.mean, self.std = (0.5,) * self.in_chans, (0.5,) * self.in_chans
        self.transform = T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    def setup(self, stage: str | None = None) -> None:
        shape = (self.in_chans, self.image_size, self.image_size)
        sets = [
            FakeData(n, shape, self.num_classes, transform=self.transform, random_offset=offset)
            for offset, n in zip((0, 10**6, 2 * 10**6), self.sizes.values(), strict=True)
        ]
        self.train_set, self.val_set, self.test_set = sets
