"""Every checkpoint of a run: written atomically, read safely, and describing its run.

`AtomicCheckpointIO` is the strategy's checkpoint plugin, so every checkpoint Lightning writes or
reads goes through it; `DescribeCheckpoints` puts the run's description (rundir.checkpoint) into
each one.
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
from pytorch_lightning.plugins import TorchCheckpointIO

from gunn_exp import rundir
from gunn_exp.rundir.build import model_spec
from gunn_exp.rundir.checkpoint import DESCRIPTION_KEY, RunDescription, load_checkpoint
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
