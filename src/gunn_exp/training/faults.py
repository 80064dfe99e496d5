"""Stopping a run without losing it: on a signal (checkpoint first) or on a non-finite loss
(before the bad step reaches the weights). Both end in a `RunStopped` error (errors.py) that
the entry point prints as one line."""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
import torch

from gunn_exp import rundir
from gunn_exp.errors import Interrupted, NonFiniteLoss
from gunn_exp.rundir.checkpoint import checkpoint_position

log = logging.getLogger(__name__)


class GracefulStop(pl.Callback):
    """On SIGTERM/SIGINT/...: finish the current batch, save `<dirpath>/last.ckpt`, stop.

    The signal handler only takes note; the checkpoint is written at the end of a training
    batch, where the state is consistent (with EpochSeeding's snapshot of the RNGs and the
    epoch's metric sums the resumed run continues exactly). The last batch of an epoch is not a
    stop point: the epoch's validation, checkpoint and metrics row come first, so every
    completed epoch is kept. Under DDP the ranks agree at every batch end (one all-reduce of a
    flag), so one signalled rank stops them all at the same batch. A second SIGINT quits at once
    (KeyboardInterrupt).

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
    """Stops a diverging run before the bad step, and keeps every checkpoint one to resume from.

    A step whose loss is nan/inf, or more than `max_loss_ratio` times the largest of the run's
    first `reference_steps` losses (a run blowing up: weights growing towards 1e20 long before
    the loss overflows), stops training before its backward pass and optimizer step. A
    checkpoint whose weights or buffers are not all finite is never written. So the checkpoints
    on disk are the last sane ones, and the message says which epoch `last.ckpt` holds.

    Costs one host sync per step (and one all-reduce of a flag under DDP, so every rank stops
    at the same step). The reference losses are saved in checkpoints, so a resumed run keeps
    comparing with the run's own start.
    """

    def __init__(
        self, dirpath: str, max_loss_ratio: float | None = 100.0, reference_steps: int = 10
    ) -> None:
        self.last = Path(dirpath) / rundir.ckpt_name(rundir.LAST)
        self.max_loss_ratio = max_loss_ratio
        self.reference_steps = reference_steps
        self.first_losses: list[float] = []

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        value = float(loss.detach().float().mean())
        problem = None
        if not math.isfinite(value):
            problem = f"non-finite training loss ({value})"
        elif self.first_losses and self._limit() is not None and value > self._limit():
            problem = (
                f"diverging training loss ({value:.4g}, more than {self.max_loss_ratio:g}x the "
                f"run's first losses, max {max(self.first_losses):.4g})"
            )
        elif len(self.first_losses) < self.reference_steps:
            self.first_losses.append(value)
        if not trainer.strategy.reduce_boolean_decision(problem is not None, all=False):
            return
        problem = problem or "another rank's non-finite or diverging training loss"
        raise NonFiniteLoss(
            f"{problem} in epoch {trainer.current_epoch + 1}, step {trainer.global_step}: "
            f"stopped before this step updated the weights; {self._kept()}. Lower optimizer.lr, "
            f"clip gradients (trainer.gradient_clip_val=1.0) or check the data."
        )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Before the file is written: raising here keeps the previous checkpoint on disk.
        bad = [
            name
            for name, tensor in checkpoint.get("state_dict", {}).items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            raise NonFiniteLoss(
                f"non-finite weights ({', '.join(bad[:3]) or 'on another rank'}) at the end of "
                f"epoch {trainer.current_epoch + 1}: not saved; {self._kept()}. Lower "
                f"optimizer.lr, clip gradients (trainer.gradient_clip_val=1.0) or check the data."
            )

    def state_dict(self) -> dict[str, Any]:
        return {"first_losses": list(self.first_losses)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.first_losses = list(state_dict.get("first_losses", []))

    def _limit(self) -> float | None:
        if self.max_loss_ratio is None:
            return None
        return self.max_loss_ratio * max(self.first_losses)

    def _kept(self) -> str:
        if not self.last.is_file():
            return "no checkpoint was written yet"
        return (
            f"the last good checkpoint is {self.last} ({checkpoint_position(self.last)}): resume "
            f"from it with `ckpt_path=last hydra.run.dir={self.last.parent.parent}` and a fix"
        )
