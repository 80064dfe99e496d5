"""Experiment-logger extras Lightning does not do for us: wandb sweep groups, one wandb run per
run directory across resumes, the config as hyper-parameters, plots.

Lightning gives every logger the metrics and `log_hyperparams`; the final curves image needs each
library's own call (wandb: an image, TensorBoard: an image summary, MLflow: an artifact).
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp import rundir
from gunn_exp.config import in_multirun
from gunn_exp.errors import ConfigError


def sweep_group() -> str | None:
    """The multirun sweep directory's name, so a sweep's runs share one wandb group."""
    return Path(HydraConfig.get().sweep.dir).name if in_multirun() else None


def wandb_group(cfg: DictConfig) -> str | None:
    """Resolver-free default for `logger.wandb.group`: explicit value, else the sweep's name."""
    explicit = OmegaConf.select(cfg, "logger.wandb.group")
    return explicit if explicit is not None else sweep_group()


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    """The experiment loggers of the `logger` group; wandb's with its sweep group and the run's
    wandb id (one wandb run per run directory, across resumes)."""
    wandb = {"group": wandb_group(cfg), **wandb_resume_kwargs(cfg, run_dir)}
    return [
        instantiate(conf, **(wandb if name == "wandb" else {}))
        for name, conf in (cfg.get("logger") or {}).items()
        if conf and "_target_" in conf
    ]


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
    id_file = run_dir / rundir.WANDB_ID
    if id_file.is_file():
        return {"id": id_file.read_text().strip(), "resume": "allow"}
    run_id = secrets.token_hex(4)  # wandb's own ids are 8 lowercase alphanumerics too
    if rank_zero_only.rank == 0:  # only rank 0 talks to wandb
        rundir.atomic_write(id_file, run_id + "\n")
    return {"id": run_id, "resume": "allow"}


@rank_zero_only
def log_run_setup(loggers: list[Logger], cfg: DictConfig, params: int) -> None:
    """Record the resolved config and the parameter count with every logger.

    Rank 0 only: Lightning gives the other ranks of a DDP run a dummy `experiment` (no summary).
    """
    hparams: dict[str, Any] = {"params": params, **flat_config(cfg)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            start_wandb_run(logger)
        logger.log_hyperparams(hparams)
        if isinstance(logger, WandbLogger):
            logger.experiment.summary["params"] = params


def start_wandb_run(logger: WandbLogger) -> None:
    """Open the wandb run before training: without a login, wandb prompts on a terminal and
    otherwise (a batch job, a cluster, CI) raises from inside the first log call. That becomes
    one line naming the ways on."""
    import wandb

    try:
        logger.experiment  # noqa: B018 (the property starts the run)
    except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as err:
        raise ConfigError(
            f"logger=wandb cannot start a run: {err} Fix: run `wandb login` (or set "
            f"WANDB_API_KEY), or log offline with WANDB_MODE=offline (upload later with `wandb "
            f"sync`), or choose another logger (logger=csv, logger=none)."
        ) from None


@rank_zero_only
def log_curves(loggers: list[Logger], path: Path) -> None:
    """Attach the run's final curves plot to wandb, TensorBoard and MLflow runs (rank 0 only)."""
    if not path.is_file():
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="curves", images=[str(path)])
        elif isinstance(logger, TensorBoardLogger):
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            logger.experiment.add_image("curves", pixels, dataformats="HWC")
            logger.experiment.flush()
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_artifact(logger.run_id, str(path))


def finish_wandb_run(failed: bool) -> None:
    """End this process's wandb run, if one is open.

    WandbLogger reuses a run that is still open, so without this the second job of an in-process
    sweep (Hydra's basic launcher, Optuna) would log into the first job's wandb run.
    """
    wandb = sys.modules.get("wandb")  # not imported: no wandb run to end
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)


# Machine-specific or bookkeeping groups: not hyper-parameters of the experiment.
SKIP_FROM_HPARAMS = ("paths/", "callbacks/", "logger/", "hydra/")


def flat_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat `group/key` hyper-parameters."""

    def flatten(node: Any, prefix: str) -> dict[str, Any]:
        if isinstance(node, dict):
            flat: dict[str, Any] = {}
            for key, sub in node.items():
                flat.update(flatten(sub, f"{prefix}{key}/"))
            return flat
        return {prefix.rstrip("/"): node}

    container = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in flatten(container, "").items() if not k.startswith(SKIP_FROM_HPARAMS)}
