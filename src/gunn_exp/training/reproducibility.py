"""Every seed of a run, and the state a resumed run needs to continue exactly.

Lightning checkpoints restore weights, optimizer, scheduler and loop counters, but not the global
RNGs, and the default shuffling draws its order from the global torch RNG whenever an iterator
is created, so a resumed run would see other batches and other random draws than an
uninterrupted one. Kept beside Lightning's `seed_everything` (which seeds once per run) because
per-epoch seeds are what make an epoch independent of how often the run was stopped:

- `derive_seed` (data/seeding.py): the one function every seed comes from (global per epoch and
  rank, shuffling, DataLoader worker seeds, each training sample's augmentation, the on-device
  loader's order and augmentation);
- `EpochSeeding`: seeds every epoch from (run seed, epoch, rank) and every training sample from
  (run seed, epoch, sample index), in whichever process loads it (data/seeding.py); a checkpoint
  written mid-epoch (on a signal, see faults.py) also carries the RNG states of that moment, the
  running sums of the module's metrics and how many batches of the epoch were done, and the
  resumed run continues from exactly there: a DataLoader skips those batches (`SeededSampler`),
  the on-device loader is positioned by its own `state_dict`/`load_state_dict`, which Lightning
  saves and restores (data/device_loader.py).
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler
from torchmetrics import Metric

from gunn_exp.data.device_loader import DeviceLoader
from gunn_exp.data.seeding import SeededSampler, SeededSamples, derive_seed


def rng_states() -> dict[str, Any]:
    """Snapshot of the python, numpy, torch CPU and (when present) CUDA global RNGs.

    Only tensors and plain Python values, so checkpoints still load with `weights_only=True`.
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore a `rng_states()` snapshot (CUDA states only when this machine has the same GPUs)."""
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.device_count() == len(states["cuda"]):
        torch.cuda.set_rng_state_all(states["cuda"])


def metric_states(module: nn.Module) -> dict[str, dict[str, Any]]:
    """The running state of every torchmetrics metric in `module` (an epoch's sums so far)."""
    return {
        name: dict(metric.metric_state)
        for name, metric in module.named_modules()
        if isinstance(metric, Metric)
    }


def set_metric_states(module: nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Put a `metric_states()` snapshot back, onto the metrics' devices."""
    metrics = dict(module.named_modules())
    for name, state in states.items():
        metric = metrics[name]
        assert isinstance(metric, Metric)
        for attr, value in state.items():  # a tensor, or a list of them (cat-reduced states)
            to = metric.device
            setattr(
                metric, attr, [v.to(to) for v in value] if isinstance(value, list) else value.to(to)
            )


class EpochSeeding(pl.Callback):
    """Seeds every epoch from (seed, epoch, rank) and resumes mid-epoch checkpoints exactly.

    At each epoch start: the global RNGs (dropout), the train loader's shuffling generator (a
    single-process RandomSampler; Lightning's DistributedSampler is already seeded by epoch), its
    worker-seed generator and the epoch's key for the per-sample augmentation seeds
    (data/seeding.py: the same draws in the main process or any worker) are all reseeded. The
    run's result thus depends only on the seed, never on how many times it was stopped and
    resumed.

    The callback's checkpoint state records the epoch, the batches done in it, the RNG states
    and the module's metric states (the epoch's training sums so far); resuming from a
    checkpoint written between two batches (Lightning then skips `on_train_epoch_start`)
    restores them and skips the batches already trained on, so even the interrupted epoch's
    training averages are the uninterrupted run's.

    Limits: under DDP a mid-epoch checkpoint holds rank 0's global RNG states only (dropout on
    the other ranks differs after such a resume; their augmentation does not).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        if seed is not None:  # this callback is what makes such a resume exact
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before")
        self._epoch = -1
        self._batches = 0
        self._seeded_epoch = -1
        self._resume: dict[str, Any] | None = None
        self._loader_started = False  # the first epoch's iterator predates every epoch hook
        self._module: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._module = pl_module  # whose metric sums state_dict() saves

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "rng": rng_states(),
            "metrics": metric_states(self._module) if self._module is not None else {},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seed is None:
            return
        self._loader_started = True
        state, self._resume = self._resume, None
        epoch = trainer.current_epoch
        done = state["batches"] if state and state["epoch"] == epoch else 0
        if not 0 < done < trainer.num_training_batches:
            return  # an epoch boundary: on_train_epoch_start seeds the epoch
        self._prepare_loader(trainer, epoch, skip_batches=done)
        set_rng_states(state["rng"])
        set_metric_states(pl_module, state.get("metrics", {}))
        self._epoch, self._batches, self._seeded_epoch = epoch, done, epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.seed is None:
            return
        epoch = trainer.current_epoch
        if epoch != self._seeded_epoch:
            self._prepare_loader(trainer, epoch, skip_batches=0)
            # Python, numpy, torch (CPU and GPUs); workers=True keeps Lightning's worker seeding
            # on (their base seed is drawn from loader.generator, set above).
            pl.seed_everything(
                derive_seed(self.seed, epoch, trainer.global_rank, 0), workers=True, verbose=False
            )
            self._seeded_epoch = epoch
        self._epoch, self._batches = epoch, 0

    def on_train_batch_end(self, *args: Any) -> None:
        # Lightning passes (trainer, pl_module, outputs, batch, batch_idx); only the index counts.
        self._batches = args[-1] + 1

    def _prepare_loader(self, trainer: pl.Trainer, epoch: int, skip_batches: int) -> None:
        """Seed the train loader's generators for `epoch` and skip batches a resumed epoch did."""
        loader = trainer.train_dataloader
        assert self.seed is not None
        if isinstance(loader, DeviceLoader):
            # Its own seeds derive from this one; Lightning restores its position in the epoch.
            loader.seed = self.seed
            return
        if not isinstance(loader, DataLoader):
            return
        rank = trainer.global_rank
        # The iterator's worker-seed draw uses this generator, not the global RNG.
        loader.generator = torch.Generator().manual_seed(derive_seed(self.seed, epoch, rank, 1))
        if isinstance(loader.sampler, RandomSampler):
            loader.sampler.generator = torch.Generator().manual_seed(
                derive_seed(self.seed, epoch, 0, 2)
            )
        batch_sampler = loader.batch_sampler
        if isinstance(batch_sampler, BatchSampler):
            sampler = batch_sampler.sampler
            if isinstance(sampler, SeededSampler):
                sampler = sampler.sampler
            seeded = isinstance(loader.dataset, SeededSamples)  # it reads (index, key) items
            batch_sampler.sampler = SeededSampler(
                sampler,
                # Not (seed, epoch, 3): SeedSequence pads with zeros, so that would be rank 3's
                # global seed (seed, epoch, 3, 0). The rank does not enter: sample i of an epoch
                # draws the same on any number of processes.
                key=derive_seed(self.seed, epoch, 0, 3) if seeded else None,
                skip=skip_batches * batch_sampler.batch_size,
            )
        # Lightning creates a fit's first iterator before any callback hook, and worker
        # processes have already drawn indices from it: restart it with the order set above
        # (iter() on a persistent-workers loader resets, in place, the iterator Lightning holds).
        if self._loader_started and loader.num_workers > 0 and loader.persistent_workers:
            iter(loader)
        self._loader_started = False
