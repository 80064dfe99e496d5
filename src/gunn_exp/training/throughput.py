"""Speed and memory per epoch, to every logger: images/s of training and of evaluation, and the
accelerator's peak memory (system metrics such as GPU utilisation come from the loggers
themselves, e.g. wandb's system panel)."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch

GIB = 2**30


class Throughput(pl.Callback):
    """Logs `perf/{train,val}_images_per_s` every training epoch, `perf/test_images_per_s` after
    the test, and `perf/peak_memory_gib` (the epoch's peak allocated accelerator memory, CUDA only).

    Training time runs from the epoch's start to its last training batch, data loading included,
    validation (at the end or inside the epoch) and other callbacks' end-of-epoch work (plots,
    checkpoints) excluded; evaluation time is that of the validation or test loops. Rates are
    summed over DDP ranks (each rank counts its own images), the peak is the largest rank's.
    """

    def __init__(self) -> None:
        self._mark = 0.0  # when the time counted next began
        self._seconds: dict[str, float] = {}  # loop -> seconds so far this epoch (or test)
        self._images: dict[str, int] = {}  # loop -> images so far this epoch (or test)

    def _add(self, loop: str, images: int) -> None:
        """Count `images` and the time since the mark for `loop`; the next interval starts now."""
        now = time.perf_counter()
        self._seconds[loop] = self._seconds.get(loop, 0.0) + now - self._mark
        self._images[loop] = self._images.get(loop, 0) + images
        self._mark = now

    def _log_rate(self, pl_module: pl.LightningModule, loop: str) -> None:
        seconds, images = self._seconds.pop(loop, 0.0), self._images.pop(loop, 0)
        if images and seconds > 0:
            rate = images / seconds
            pl_module.log(f"perf/{loop}_images_per_s", rate, sync_dist=True, reduce_fx="sum")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A resume from a mid-epoch checkpoint skips that epoch's on_train_epoch_start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._seconds.clear()
        self._images.clear()
        self._mark = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, _module: Any, _out: Any, batch: Any, *_: Any
    ) -> None:
        self._add("train", len(batch[1]))  # one label per image

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_validation_batch_end(
        self, trainer: pl.Trainer, _module: Any, _out: Any, batch: Any, *_: Any
    ) -> None:
        if not trainer.sanity_checking:
            self._add("val", len(batch[1]))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loop's end (the module's epoch-end hook, metrics computed, synced and logged) is
        # evaluation time too; after a validation inside the epoch, the next training batch's
        # time starts here.
        if not trainer.sanity_checking:
            self._add("val", 0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_rate(pl_module, "train")
        self._log_rate(pl_module, "val")
        if pl_module.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(pl_module.device) / GIB
            pl_module.log("perf/peak_memory_gib", peak, sync_dist=True, reduce_fx="max")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._mark = time.perf_counter()

    def on_test_batch_end(
        self, trainer: pl.Trainer, _module: Any, _out: Any, batch: Any, *_: Any
    ) -> None:
        self._add("test", len(batch[1]))

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_rate(pl_module, "test")
