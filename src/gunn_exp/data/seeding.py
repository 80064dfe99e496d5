"""The one function every seed of a run comes from, and the per-sample seeds of the training
data (training/reproducibility.py: the scheme).

A sample's random augmentation is drawn from torch's generator seeded by (the epoch's key, the
sample's index), wherever and whenever it is loaded: in the main process or in any DataLoader
worker, after any number of samples before it, in a fresh or a resumed process. So a resumed run
augments every sample as an uninterrupted one did, which a worker's own RNG (it lives as long as
the worker, and depends on which samples that worker happened to load) cannot give.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def derive_seed(seed: int, *keys: int) -> int:
    """A well-mixed 32-bit seed for one (run seed, epoch, rank, stream, ...) combination: the
    same in every process and every Python (unlike `hash`), independent for different keys."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0])


class SeededSampler(Sampler):
    """`sampler`'s indices without the first `skip` (the samples a resumed epoch had done), each
    as `(index, key)` for a `SeededSamples` dataset to seed from; plain indices if `key` is None.

    Its length stays the full epoch's so Lightning's batch counting is unchanged.
    """

    def __init__(self, sampler: Sampler[int], key: int | None, skip: int = 0) -> None:
        self.sampler = sampler
        self.key = key
        self.skip = skip

    def __iter__(self) -> Iterator[Any]:
        indices = itertools.islice(iter(self.sampler), self.skip, None)
        if self.key is None:
            return indices
        return ((index, self.key) for index in indices)

    def __len__(self) -> int:
        assert isinstance(self.sampler, Sized)
        return len(self.sampler)


class SeededSamples(Dataset):
    """`dataset`, whose item `(index, key)` is `dataset[index]` drawn with torch's generator
    seeded from (key, index); a plain index reads `dataset[index]` as it is.

    The generator's state is put back afterwards, so loading in the main process
    (num_workers=0) leaves the training's own random stream (dropout) alone. Only torch's
    generator is seeded: the transforms here (torchvision's and data/transforms.py's) draw from
    it; one drawing from Python's `random` or NumPy would not be exact across a resume.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._key: int | None = None
        self._seeds = np.empty(0, dtype=np.uint32)

    def __len__(self) -> int:
        assert isinstance(self.dataset, Sized)
        return len(self.dataset)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.dataset[item]
        index, key = item
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(self.sample_seed(key, index))
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)

    def sample_seed(self, key: int, index: int) -> int:
        """Sample `index`'s seed under `key`: one SeedSequence draw per key gives every sample's
        (a SeedSequence per sample, as `derive_seed`, would cost a tenth of a CIFAR sample's
        augmentation; this draw takes 6 ms for CIFAR's 50,000 images, once per epoch)."""
        if key != self._key:
            self._key, self._seeds = key, np.random.SeedSequence(key).generate_state(len(self))
        return int(self._seeds[index])
