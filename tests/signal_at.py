"""A callback that signals its own process at a given training batch: a deterministic stand-in for
SLURM or a user sending SIGTERM/SIGINT (used in-process and, through the train.py command line
`+callbacks.signal_at._target_=signal_at.SignalAt`, in subprocesses)."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Sends `signum` to this process `times` times in a row (a second Ctrl-C while the first
    is being handled) at the end of training batch `batch` of epoch `epoch`."""

    def __init__(self, signum: int, batch: int, epoch: int = 0, times: int = 1) -> None:
        self.signum, self.batch, self.epoch, self.times = signum, batch, epoch, times

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)  # Python runs the handler before returning
