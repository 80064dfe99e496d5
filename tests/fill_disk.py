"""A callback that fills the run directory's filesystem at a given hook of a given epoch, so the
run's next write there meets a real full disk: ENOSPC from the kernel, not a patched function
(train.py command line: `+callbacks.fill_disk._target_=fill_disk.FillDisk`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl


class FillDisk(pl.Callback):
    """At `hook` (`on_validation_end` or `on_train_epoch_end`) of epoch `epoch` (0-based), grows
    `<folder>/filler` until less than `leave` + 4 KiB of the filesystem is free."""

    def __init__(self, folder: str, epoch: int, hook: str, leave: int = 0) -> None:
        self.filler = Path(folder) / "filler"
        self.epoch, self.hook, self.leave = epoch, hook, leave

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fill_at(trainer, "on_validation_end")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fill_at(trainer, "on_train_epoch_end")

    def _fill_at(self, trainer: pl.Trainer, hook: str) -> None:
        if (
            hook == self.hook
            and trainer.current_epoch == self.epoch
            and not trainer.sanity_checking
        ):
            fill(self.filler, self.leave)


def fill(path: Path, leave: int) -> None:
    """Append to `path` while `leave` bytes plus one more chunk are free (tmpfs counts 4 KiB
    pages, so with `leave=0` no new file gets a single byte)."""
    with path.open("ab", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12):
            while free_bytes(path) >= leave + chunk:
                f.write(bytes(chunk))  # a partial write near the end is fine: free is rechecked


def free_bytes(path: Path) -> int:
    stat = os.statvfs(path.parent)
    return stat.f_bavail * stat.f_frsize
