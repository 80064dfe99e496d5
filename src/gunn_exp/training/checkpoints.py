"""Every checkpoint of a run: written atomically, read safely, describing its run, and resuming
it as an uninterrupted run would have gone on.

`AtomicCheckpointIO` is the strategy's checkpoint plugin, so every checkpoint Lightning writes or
reads goes through it; `DescribeCheckpoints` puts the run's description (rundir.checkpoint) into
each one; `ResumeAsInPlace` keeps, across a resume, what Lightning would lose: the epoch's logged
values when no epoch is left to run, and the best checkpoint of a run directory that was moved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins import TorchCheckpointIO

from gunn_exp import rundir
from gunn_exp.rundir.build import model_spec
from gunn_exp.rundir.checkpoint import (
    DESCRIPTION_KEY,
    FIT_METRICS_KEY,
    RunDescription,
    load_checkpoint,
)
from gunn_exp.rundir.preprocessing import Preprocessing

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing through `rundir.atomic_write` and reading through
    `rundir.checkpoint.load_checkpoint` for local paths.

    Writing: Lightning's own writer stages the file in the system temp directory and moves it (a
    non-atomic copy when that is another filesystem, typical on clusters) and never fsyncs.
    Reading: Lightning unpickles with `weights_only=False` unless told otherwise, which lets a
    resumed checkpoint run code. Every checkpoint Lightning writes or reads (ModelCheckpoint,
    the signal handler's save, a resume) goes through the strategy's CheckpointIO, so this one
    plugin covers all of them. Remote (fsspec) paths keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        rundir.atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(path, map_location="cpu" if map_location is None else map_location)


class DescribeCheckpoints(pl.Callback):
    """Puts the run's description into every checkpoint (model and arguments, classes,
    preprocessing, resolved config; rundir.checkpoint.RunDescription), so a checkpoint is usable
    on its own, and writes `classes.json` and `preprocessing.json` into the run directory for
    people and tools, as soon as the data is set up."""

    def __init__(self, cfg: DictConfig, output_dir: Path) -> None:
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.model, self.model_args = model_spec(self.config["model"], "the run's config")
        self.output_dir = output_dir
        self.description: RunDescription | None = None

    def _describe(self, trainer: pl.Trainer) -> RunDescription:
        if self.description is None:
            data = trainer.datamodule  # set up by now: digits' statistics exist after setup()
            self.description = RunDescription(
                model=self.model,
                model_args=self.model_args,
                classes=list(data.classes),
                preprocessing=Preprocessing.from_datamodule(data).to_dict(),
                config=self.config,
            )
            if trainer.is_global_zero:
                rundir.write_classes(self.description.classes, self.output_dir)
                Preprocessing.from_dict(self.description.preprocessing).save(self.output_dir)
        return self.description

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._describe(trainer)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._describe(trainer)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[DESCRIPTION_KEY] = self._describe(trainer).to_dict()


class ResumeAsInPlace(pl.Callback):
    """A resumed run ends as the uninterrupted run would have, wherever its directory now is.

    - The values logged last in fit (`trainer.callback_metrics`: final val/train errors, lr, the
      best val error) go into every checkpoint. A run resumed after its last epoch (killed during
      its final test) runs no epoch, so Lightning logs nothing; `fit_metrics` gives those values.
    - A run directory copied elsewhere (scratch -> home) and resumed there: Lightning's
      ModelCheckpoint sees another `dirpath` and forgets its best score and files, so the next
      epoch becomes a new `best-v1.ckpt` beside `best.ckpt`. When the checkpoint files it names
      came along (same names in the new dirpath), its state is moved to the new directory first.
    """

    def __init__(self) -> None:
        self.restored_metrics: dict[str, float] = {}

    def fit_metrics(self, trainer: pl.Trainer) -> dict[str, float]:
        """The values logged last in fit, by name (the resumed checkpoint's if fit ran no epoch)."""
        logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
        return logged or dict(self.restored_metrics)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[FIT_METRICS_KEY] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Before Lightning hands each callback its state (Checkpoint._restore_callbacks order).
        self.restored_metrics = dict(checkpoint.get(FIT_METRICS_KEY) or {})
        states = checkpoint.get("callbacks") or {}
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if isinstance(callback, ModelCheckpoint) and isinstance(state, dict):
                _follow_moved_dirpath(state, callback.dirpath)


def _follow_moved_dirpath(state: dict[str, Any], dirpath: str | None) -> None:
    """Point a ModelCheckpoint state saved in another directory at `dirpath`, when every file it
    names is there under the same name (the run was moved, checkpoints included)."""
    old = state.get("dirpath")
    if not old or not dirpath or old == dirpath:
        return
    named = [p for p in (state.get("best_model_path"), state.get("last_model_path")) if p]
    named += list(state.get("best_k_models") or {})
    if not named or not all((Path(dirpath) / Path(p).name).is_file() for p in named):
        return  # not the same run's files: Lightning's own handling (a fresh directory)

    def moved(path: str) -> str:
        return str(Path(dirpath) / Path(path).name) if path else path

    state["dirpath"] = dirpath
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if state.get("best_k_models"):
        state["best_k_models"] = {moved(p): v for p, v in state["best_k_models"].items()}
    log.info(f"run moved: checkpoints of {old} continue in {dirpath}")
