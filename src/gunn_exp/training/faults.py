"""Stopping a run without losing it: on a signal (checkpoint first) or on a non-finite loss
(before the bad step reaches the weights). Both end in a `RunStopped` error (errors.py) that
the entry point prints as one line."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch

from gunn_exp import rundir
from gunn_exp.errors import Interrupted, NonFiniteLoss

log = logging.getLogger(__name__)


class GracefulStop(pl.Callback):
    """On SIGTERM/SIGINT/...: finish the current batch, save `<dirpath>/last.ckpt`, stop.

    The signal handler only takes note; the checkpoint is written at the end of a training
    batch, where the state is consistent (together with EpochSeeding's RNG snapshot the resumed
    run continues exactly). The last batch of an epoch is not a stop point: the epoch's
    validation, checkpoint and metrics row come first, so every completed epoch is kept. Under
    DDP the ranks agree at every batch end (one all-reduce of a flag), so one signalled rank
    stops them all at the same batch. A second SIGINT quits at once (KeyboardInterrupt).

    Handlers that were installed before training (e.g. submitit's requeue handler on SIGUSR2)
    are called after the checkpoint is written, so a cluster launcher still requeues the job.
    """

    def __init__(self, dirpath: str, signals: list[str] | tuple[str, ...] = ("SIGTERM", "SIGINT")):
        self.dirpath = Path(dirpath)
        self.signals = [signal.Signals[name] for name in signals]
        self.received: signal.Signals | None = None
        self._before_training: dict[signal.Signals, Any] = {}
        self._before_callback: dict[signal.Signals, Any] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Taken before Lightning installs its own handlers (in fit, after setup).
        self._before_training = {s: signal.getsignal(s) for s in self.signals}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only
        self.received = None
        for signum in self.signals:
            self._before_callback[signum] = signal.getsignal(signum)
            signal.signal(signum, self._note)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._before_callback.items():
            signal.signal(signum, handler)
        self._before_callback = {}

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
        self.received = signal.Signals(signum)
        log.warning(
            f"received {self.received.name}: saving a checkpoint after this training batch, "
            f"then stopping (Ctrl-C again to quit without it)."
        )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end (validation, checkpoint, metrics row) comes first
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = self.dirpath / rundir.ckpt_name(rundir.LAST)
        trainer.save_checkpoint(path)
        name = self.received.name if self.received else "another rank's signal"
        message = (
            f"{name} in epoch {trainer.current_epoch + 1} after batch {batch_idx + 1}/"
            f"{trainer.num_training_batches}: checkpoint saved to {path}. Resume with the same "
            f"command plus `ckpt_path=last hydra.run.dir={self.dirpath.parent}`."
        )
        log.warning(message)
        signum = self.received or signal.SIGTERM
        previous = self._before_training.get(signum)
        self._restore()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)  # e.g. submitit: requeue the job now that the state is saved
        raise Interrupted(message, signum)


class FiniteLossGuard(pl.Callback):
    """Stops training when the loss is nan/inf, before its backward pass and optimizer step.

    The weights stay those of the last good step and nothing is saved, so the checkpoints on
    disk are the last good ones. Costs one host sync per step (and one all-reduce of a flag
    under DDP, so every rank stops at the same step).
    """

    def __init__(self, dirpath: str) -> None:
        self.last = Path(dirpath) / rundir.ckpt_name(rundir.LAST)

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        kept = (
            f"the last good checkpoint is {self.last}"
            if self.last.is_file()
            else "no checkpoint was written yet"
        )
        raise NonFiniteLoss(
            f"non-finite training loss ({loss.item()}) in epoch {trainer.current_epoch + 1}, "
            f"step {trainer.global_step}: stopped before this step updated the weights; "
            f"{kept}. Lower optimizer.lr, clip gradients (trainer.gradient_clip_val=1.0) or check "
            f"the data."
        )
