"""Resuming a run: which checkpoint `ckpt_path` means, refusing one that cannot resume this config,
and keeping the resumed run in the same wandb run."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from gunn_exp.checkpointing import CheckpointError, load_checkpoint
from gunn_exp.faults import LAST
from gunn_exp.weights import StateDiff, model_state

log = logging.getLogger(__name__)

# Keys Lightning needs to continue training (a weights-only file has just `state_dict`).
TRAINING_STATE = ("epoch", "global_step", "loops", "optimizer_states", "callbacks")
WANDB_ID_FILE = "wandb_id.txt"


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
        last = run_dir / "checkpoints" / LAST
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
        source = run_model_name(path)
        written_by = f" It was written by a run of model {source}." if source else ""
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_name}: {diff}.{written_by} Resume "
            f"with the overrides of the run that wrote it (model=..., its model options)."
        )
    log.info(f"resuming from {path} (epoch {ckpt['epoch'] + 1}, step {ckpt['global_step']})")


def run_model_name(path: Path) -> str | None:
    """The model name in the config.yaml of the run directory holding checkpoint `path`."""
    config = path.parent.parent / "config.yaml"
    if not config.is_file():
        return None
    return OmegaConf.select(OmegaConf.load(config), "model.name")


def wandb_resume_kwargs(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """`id`/`resume` for the WandbLogger so a resumed run continues the same wandb run.

    The id is made once per run directory and kept in `wandb_id.txt` beside the checkpoints;
    `resume="allow"` continues that run if wandb knows it and starts it otherwise. An explicit
    `logger.wandb.id` wins.
    """
    if OmegaConf.select(cfg, "logger.wandb._target_") is None:
        return {}
    explicit = OmegaConf.select(cfg, "logger.wandb.id")
    if explicit:
        return {"id": explicit, "resume": "allow"}
    id_file = run_dir / WANDB_ID_FILE
    if id_file.is_file():
        return {"id": id_file.read_text().strip(), "resume": "allow"}
    run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase alphanumerics too
    if rank_zero_only.rank == 0:  # only rank 0 talks to wandb
        id_file.write_text(run_id + "\n")
    return {"id": run_id, "resume": "allow"}
