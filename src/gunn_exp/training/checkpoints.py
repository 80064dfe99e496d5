"""Training checkpoints: which file `ckpt_path` means, refusing one that cannot resume this config,
and writing every checkpoint atomically (a kill during a save never leaves a truncated file)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins import TorchCheckpointIO
from torch import nn

from gunn_exp import rundir
from gunn_exp.errors import CheckpointError
from gunn_exp.inference.weights import StateDiff, load_checkpoint, model_state

log = logging.getLogger(__name__)

# Keys Lightning needs to continue training (a weights-only file has just `state_dict`).
TRAINING_STATE = ("epoch", "global_step", "loops", "optimizer_states", "callbacks")


def resolve_ckpt_path(value: str | None, run_dir: Path) -> Path | None:
    """The checkpoint file `ckpt_path=<value>` means for a run writing into `run_dir`.

    - null: a fresh run;
    - `last`: `<run_dir>/checkpoints/last.ckpt`, which must exist: resume the run whose
      directory is given with `hydra.run.dir=<run dir>`;
    - `auto`: the same file if it exists, else a fresh run: for jobs that may be requeued
      (SLURM preemption, timeouts), which rerun the same command into the same directory;
    - anything else: that file.
    """
    if value is None:
        return None
    if value in ("last", "auto"):
        last = rundir.checkpoint(run_dir, rundir.LAST)
        if last.is_file():
            return last
        if value == "auto":
            return None
        raise CheckpointError(
            f"ckpt_path=last: there is no {last}. To resume a run, point Hydra at its directory: "
            f"`python train.py <the run's overrides> ckpt_path=last hydra.run.dir=<run dir>` "
            f"(ckpt_path=auto starts afresh when there is nothing to resume)."
        )
    return Path(value).expanduser().resolve()


def check_resumable(path: Path, model: nn.Module, model_name: str) -> None:
    """Refuse a checkpoint that is corrupt, holds weights only, or belongs to another model.

    Run before anything is written into the run directory, so a refused resume leaves it as
    it was. The message names the checkpoint's model (from its run's config.yaml) and the
    tensors that differ.
    """
    ckpt = load_checkpoint(path)
    missing = [key for key in TRAINING_STATE if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} cannot resume training: it has no {', '.join(missing)} (weights "
            f"only). Use init_from={path} to start a new run from its weights."
        )
    diff = StateDiff.between(model, model_state(ckpt, path))
    if diff:
        source = rundir.run_model_name(path)
        written_by = f" It was written by a run of model {source}." if source else ""
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_name}: {diff}.{written_by} Resume "
            f"with the overrides of the run that wrote it (model=..., its model options)."
        )
    log.info(f"resuming from {path} (epoch {ckpt['epoch'] + 1}, step {ckpt['global_step']})")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer through `rundir.atomic_write` for local paths.

    Kept because Lightning's own writer stages the file in the system temp directory and moves
    it (a non-atomic copy when that is another filesystem, typical on clusters) and never fsyncs.
    Every checkpoint Lightning writes (ModelCheckpoint, the signal handler's save,
    `trainer.save_checkpoint`) goes through the strategy's CheckpointIO, so this one plugin makes
    all of them atomic. Remote (fsspec) paths keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        rundir.atomic_write(path, lambda f: torch.save(checkpoint, f))
