"""A train loader that keeps the whole dataset on the device and augments batches there.

For small datasets (CIFAR: 50,000 x 3 x 32 x 32 uint8 = 154 MB) the DataLoader, its worker
processes and the host-to-device copies cost more than a fast GPU needs for a GUNN-15 step. Here
the images stay on the device as uint8; each batch is gathered by index, normalised, augmented
per sample (`gpu_augment`) and optionally put in channels_last, all on the device.

API::

    loader = DeviceLoader(images, labels, batch_size=64, mean=..., std=..., device="cuda")
    len(loader)              # batches per epoch
    for x, y in loader: ...  # x: (B, C, H, W) float32 normalised; y: (B,) int64

`images`: (N, C, H, W) uint8 in [0, 255] (or float already scaled to [0, 1]); `labels`: (N,).
`mean`, `std`: per-channel, on the [0, 1] scale (e.g. `transforms.cifar_stats("cifar10")`).
`train=True`: reshuffle every epoch and augment (docs/SPEC.md §3 flip, pad-crop, optional Jigsaw);
`train=False`: fixed order, normalise only. Seeds come from `derive_seed` (training/
reproducibility.py): the epoch-e permutation from (seed, e), shared by all ranks; batch b's
augmentation from (seed, e, rank, b), so a batch's crops and flips do not depend on the batches
before it and a resumed epoch can start at any batch. Runs repeat exactly on the same device. With
`world_size > 1` each `rank` takes every world_size-th sample of the shared permutation (DDP; the
last N mod world_size samples of each permutation are skipped). Each `iter()` starts the next
epoch; `set_epoch(e)` picks one explicitly.

Lightning accepts the object as a train dataloader (an iterable with `__len__`; batches are already
on the device, so its device transfer is a no-op), calls `loader.sampler.set_epoch(current_epoch)`
before every epoch as it does for DistributedSampler, and saves `state_dict()` (epoch, batches
yielded) in every checkpoint and hands it to `load_state_dict` on resume, so a run stopped
mid-epoch continues with the next batch of the same epoch. (The count is exact: Lightning does
not prefetch from loaders that have a length.)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from gunn_exp.data.gpu_augment import augment
from gunn_exp.data.seeding import derive_seed


class EpochSampler:
    """Which epoch the loader is in; Lightning sets it through `set_epoch` like a sampler's."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class DeviceLoader:
    """Batches of a dataset tensor held on `device`, normalised and augmented there."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cuda",
        train: bool = True,
        padding: int = 4,
        flip: bool = True,
        jigsaw: bool = True,
        drop_last: bool = True,
        channels_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"DeviceLoader: images must be (N, C, H, W) with one label each; got "
                f"{tuple(images.shape)} images and {len(labels)} labels."
            )
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"DeviceLoader: need batch_size >= 1 and 0 <= rank < world_size; got "
                f"batch_size={batch_size}, rank={rank}, world_size={world_size}."
            )
        self.device = torch.device(device)
        self.images = images.to(self.device).contiguous()  # NCHW rows: one gather per batch
        self.labels = labels.to(self.device, torch.long)
        # uint8 in [0, 255] is divided by 255 together with the normalisation, in one pass.
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        shape = (1, -1, 1, 1)
        std_t = torch.tensor(std, device=self.device).view(shape) * scale
        self._mul = 1.0 / std_t
        self._sub = torch.tensor(mean, device=self.device).view(shape) * scale
        self.batch_size = batch_size
        self.train = train
        self.padding = padding
        self.flip = flip
        self.jigsaw = jigsaw
        self.drop_last = drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.sampler = EpochSampler()
        self._position = (0, 0)  # (epoch, batches yielded) of the current or last iteration
        self._resume: tuple[int, int] | None = None  # from load_state_dict, for the next iter()

    def set_epoch(self, epoch: int) -> None:
        """Make the next `iter()` produce epoch `epoch`'s order and augmentation."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """Where the loader is: the epoch it iterates and the batches it has yielded of it."""
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next `iter()` continue epoch `state["epoch"]` after `state["batches"]`."""
        self._resume = (int(state["epoch"]), int(state["batches"]))
        self.sampler.set_epoch(self._resume[0])

    def _samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.images) // self.world_size

    def __len__(self) -> int:
        n, b = self._samples(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # A generator: this runs at the first next(), after Lightning's set_epoch.
        epoch = self.sampler.epoch
        self.sampler.epoch += 1
        resume, self._resume = self._resume, None
        first = resume[1] if resume is not None and resume[0] == epoch else 0
        n = len(self.images)
        if self.train:
            order_gen = torch.Generator(device=self.device).manual_seed(
                derive_seed(self.seed, epoch)  # no rank: the ranks shard one permutation
            )
            order = torch.randperm(n, generator=order_gen, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        order = order[self.rank : self._samples() * self.world_size : self.world_size]
        aug_gen = torch.Generator(device=self.device)
        for batch in range(first, len(self)):
            self._position = (epoch, batch + 1)
            index = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            x = (self.images[index].float() - self._sub) * self._mul
            if self.train:
                aug_gen.manual_seed(derive_seed(self.seed, epoch, self.rank, batch))
                x = augment(x, self.padding, self.flip, self.jigsaw, aug_gen)
            yield x.contiguous(memory_format=self.memory_format), self.labels[index]
