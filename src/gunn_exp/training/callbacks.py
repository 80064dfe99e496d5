"""Callbacks that make a run's progress visible: the per-epoch metrics table, CSV and plot."""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import pytorch_lightning as pl

from gunn_exp import rundir
from gunn_exp.rundir.curves import plot_curves
from gunn_exp.training.loggers import log_curves

log = logging.getLogger(__name__)

COLUMNS = (
    "epoch",
    "lr",
    "train/loss",
    "train/err1",
    "train/err5",
    "val/loss",
    "val/err1",
    "val/err5",
    "epoch_time_s",
)


@runtime_checkable
class EpochMetrics(Protocol):
    """A callback that measures something once per epoch (e.g. training.singularity's probe):
    EpochSummary asks it at the epoch's end and adds what it returns to the epoch's row of
    `metrics.csv`, after the fixed COLUMNS. It returns the same values however often it is asked
    in one epoch ({} in epochs it does not measure)."""

    def epoch_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, float]: ...


class EpochSummary(pl.Callback):
    """After every training epoch: one row in `metrics.csv`, one log line, a fresh `curves.png`.

    Rows are keyed by epoch (1-based); on resume, rows past the checkpoint's epoch (written by the
    interrupted run after its last checkpoint) are dropped so the table never holds an epoch twice.
    `title` heads the plot (conf/callbacks/default.yaml: model, data and seed).
    Callbacks that are `EpochMetrics` add their columns after the fixed ones; `epoch_time_s` is
    read before they are asked, so it leaves out their work when they are listed after this
    callback (as in `callbacks=[default,singularity]`).
    """

    def __init__(self, output_dir: str, plot: bool = True, title: str = "") -> None:
        self.csv_path = Path(output_dir) / rundir.METRICS
        self.plot_path = Path(output_dir) / rundir.CURVES
        self.plot = plot
        self.title = title
        self.rows: list[dict[str, float]] = []
        self._epoch_start = 0.0
        self._epoch_lr = float("nan")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = rundir.read_metrics(self.csv_path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: Lightning restores the resumed epoch after that hook.
        self.rows = [r for r in self.rows if r["epoch"] <= trainer.current_epoch]
        # A resume from a mid-epoch checkpoint skips that epoch's on_train_epoch_start.
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.perf_counter()
        # Read now: Lightning steps epoch-interval schedulers before on_train_epoch_end.
        self._epoch_lr = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        row: dict[str, float] = {
            "epoch": trainer.current_epoch + 1,
            "lr": self._epoch_lr,
            "epoch_time_s": time.perf_counter() - self._epoch_start,
        }
        # Not `lr`: callback_metrics still holds the value logged below for the previous epoch.
        row.update({k: float(metrics[k]) for k in COLUMNS if k in metrics and k not in row})
        for callback in trainer.callbacks:
            if isinstance(callback, EpochMetrics):
                row.update(callback.epoch_metrics(trainer, pl_module))
        pl_module.log("lr", self._epoch_lr, on_step=False, on_epoch=True, rank_zero_only=True)
        self.rows.append(row)
        if not trainer.is_global_zero:
            return
        self._write_csv()
        if self.plot:
            plot_curves({"": self.rows}, self.plot_path, title=self.title)
        log.info(format_row(row, trainer.max_epochs))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.plot:
            log_curves(trainer.loggers, self.plot_path)  # the final plot, to every logger

    def _write_csv(self) -> None:
        # The fixed columns, then the others in the order they first appear.
        fields = dict.fromkeys(COLUMNS) | dict.fromkeys(k for row in self.rows for k in row)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in row.items()} for row in self.rows)
        rundir.atomic_write(self.csv_path, text.getvalue())


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e9 else f"{value:.6g}"


def format_row(row: dict[str, float], max_epochs: int | None) -> str:
    """One log line: `epoch 3/30 | lr 0.1 | train loss 0.412 err1 12.30 ... | val ... | 4.2s`."""
    parts = [f"epoch {int(row['epoch'])}/{max_epochs}", f"lr {row['lr']:.3g}"]
    for split in ("train", "val"):
        vals = [
            f"{name} {row[f'{split}/{name}']:.3f}"
            if name == "loss"
            else f"{name} {row[f'{split}/{name}']:.2f}"
            for name in ("loss", "err1", "err5")
            if f"{split}/{name}" in row
        ]
        if vals:
            parts.append(f"{split} " + " ".join(vals))
    parts.append(f"{row['epoch_time_s']:.1f}s")
    return " | ".join(parts)
