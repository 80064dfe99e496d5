"""train(cfg): build data, model and trainer from a Hydra config, fit, test, write the results."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp import rundir
from gunn_exp.config import validate_config
from gunn_exp.data import ImageDataModule
from gunn_exp.errors import ConfigError, DiskFull
from gunn_exp.inference.preprocessing import Preprocessing
from gunn_exp.inference.weights import init_from_checkpoint, load_weights
from gunn_exp.training.checkpoints import (
    AtomicCheckpointIO,
    ResumedSchedule,
    check_config_change,
    check_resumable,
    checkpoint_position,
    resolve_ckpt_path,
)
from gunn_exp.training.launch import (
    check_rank_run_dirs,
    in_multirun,
    launches_own_ranks,
    log_rank_results,
    refuse_child_process_ranks,
    run_job_as_single_run,
)
from gunn_exp.training.loggers import (
    finish_wandb_run,
    log_curves,
    log_run_setup,
    wandb_group,
    wandb_resume_kwargs,
)
from gunn_exp.training.module import ClassificationModule
from gunn_exp.training.sweep import require_tags

log = logging.getLogger(__name__)


def instantiate_group(configs: DictConfig | None, **wandb_kwargs: Any) -> list[Any]:
    """Instantiate every entry of a `callbacks`/`logger` group (a dict of named configs)."""
    if not configs:
        return []
    return [
        instantiate(conf, **(wandb_kwargs if name == "wandb" else {}))
        for name, conf in configs.items()
        if conf and "_target_" in conf
    ]


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit `cfg.model` on `cfg.data`, test the final weights, return (and save) the results.

    `train=false` (with `ckpt_path=<file>`) only tests that checkpoint; `test=false` skips the
    test set. The run directory is locked while this process writes into it (rundir.RunLock).
    """
    validate_config(cfg)
    if cfg.extras.ignore_warnings:
        warnings.filterwarnings("ignore")
    require_tags(cfg)
    refuse_child_process_ranks(cfg)
    output_dir = Path(cfg.paths.output_dir)
    # Rank 0 holds the lock; the other ranks of a DDP run write into the same run on purpose.
    lock = rundir.RunLock(output_dir) if rank_zero_only.rank == 0 else nullcontext()
    with lock:
        failed = True
        try:
            results = _train(cfg, output_dir)
            failed = False
            return results
        except Exception as err:  # a full disk, wherever the write was (ours or a library's)
            cause = rundir.out_of_space(err)
            if cause is None:
                raise
            path = err.path if isinstance(err, DiskFull) else cause.filename or output_dir
            free = shutil.disk_usage(output_dir).free
            raise DiskFull(str(path), free, intact_checkpoint_note(output_dir)) from err
        finally:
            finish_wandb_run(failed)


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    if cfg.extras.print_config:
        print_config(cfg, ["data", "model", "optimizer", "scheduler", "trainer", "seed"])
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    fit, test = bool(cfg.train), bool(cfg.test)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    if not fit and (ckpt_path is None or not test):
        raise ConfigError(
            f"train=false needs a checkpoint to test and test=true: add ckpt_path=<file.ckpt> "
            f"(got ckpt_path={cfg.ckpt_path}, test={test}); or use eval.py ckpt_path=..."
        )
    if not fit and (output_dir / rundir.RESULTS).is_file():
        raise ConfigError(
            f"train=false would overwrite {output_dir / rundir.RESULTS} of a trained run; test "
            f"into a new directory (drop hydra.run.dir) or use eval.py ckpt_path={ckpt_path}."
        )

    datamodule: ImageDataModule = instantiate(cfg.data)
    datamodule.check()  # bad data stops here, before the Trainer launches any process
    model: torch.nn.Module = instantiate(cfg.model)
    if cfg.init_from:  # fine-tuning: start from another run's weights (inference/weights.py)
        init_from_checkpoint(model, cfg.init_from, cfg.model.name)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"model {cfg.model.name}: {params:,} parameters")
    module = ClassificationModule(
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        ten_crop_reduce=cfg.ten_crop_reduce,
    )
    changed, ckpt_epochs = False, None
    # Before anything is written: a refused resume changes nothing.
    if ckpt_path is not None and fit:
        check_resumable(ckpt_path, model, cfg.model.name)
        changed = check_config_change(cfg, ckpt_path, output_dir)
    elif ckpt_path is not None:  # train=false: test these weights (refused in one line if other)
        ckpt_epochs = load_weights(model, ckpt_path, cfg.model.name).get("epoch", -1) + 1
    if rank_zero_only.rank == 0:
        rundir.save_config(cfg, output_dir, resuming=ckpt_path is not None and fit)
    callbacks = instantiate_group(cfg.callbacks)
    if changed:
        callbacks.append(ResumedSchedule())
    loggers = instantiate_group(
        cfg.logger, group=wandb_group(cfg), **wandb_resume_kwargs(cfg, output_dir)
    )
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if in_multirun() and launches_own_ranks(trainer):
        # See launch.py: DDP inside a multirun. The sweep's wandb group goes along.
        group = wandb_group(cfg) if OmegaConf.select(cfg, "logger.wandb._target_") else None
        return run_job_as_single_run(output_dir, wandb_group=group)
    check_rank_run_dirs(trainer)
    log_run_setup(loggers, cfg, params)

    start = time.perf_counter()
    if fit:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    wall_time = time.perf_counter() - start
    fitted = _metrics(trainer)  # the last epoch's values (trainer.test starts a new set)
    # The final weights are tested (the best epoch's validation error is reported beside them).
    tested: dict[str, float] = {}
    if test:
        tested = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "params": params,
        "epochs": trainer.current_epoch if fit else ckpt_epochs,
        "wall_time_s": round(wall_time, 2),
        "test_err1": tested.get("test/err1"),
        "test_err5": tested.get("test/err5"),
        "test_loss": tested.get("test/loss"),
        "best_val_err1": module.best_val_err1,
        "best_val_epoch": int(module.best_val_epoch) or None,
        "final_val_err1": fitted.get("val/err1"),
        "final_val_err5": fitted.get("val/err5"),
        "output_dir": str(output_dir),
        "tags": list(cfg.tags),
        # Every metric by its logged name: what optimized_metric selects from.
        "metrics": {**fitted, **tested},
    }
    if not fit:
        results["ckpt_path"] = str(ckpt_path)
    if trainer.is_global_zero:
        # Class names let a run directory classify images on its own (see classify.py).
        rundir.write_json(output_dir / rundir.CLASSES, list(datamodule.classes), sort_keys=False)
        Preprocessing.from_datamodule(datamodule).save(output_dir)
        rundir.write_results(results, output_dir)
        log_curves(loggers, output_dir / rundir.CURVES)
        for line in summary_lines(results):
            log.info(line)
    log_rank_results(trainer, results)
    return results


def _metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The values logged last, by name (e.g. val/err1, val/err1_best)."""
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def intact_checkpoint_note(run_dir: Path) -> str:
    """What survives a failed write: the last checkpoint (atomic writes leave it whole)."""
    last = rundir.checkpoint(run_dir, rundir.LAST)
    if not last.is_file():
        return "no checkpoint was written yet; free space and start the run again."
    return (
        f"{last} is intact ({checkpoint_position(last)}); free space and resume with "
        f"`ckpt_path=last hydra.run.dir={run_dir}` and the run's overrides."
    )


def print_config(cfg: DictConfig, fields: Sequence[str]) -> None:
    """Show the resolved config as a tree, one branch per top-level group."""
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for field in fields:
        value = cfg.get(field)
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(field).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rprint(tree)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The closing lines of a run: what was trained and how well."""

    def pct(key: str) -> str:
        value = results.get(key)
        return "n/a" if value is None else f"{value:.2f}%"

    return [
        f"model {results['model']} ({results['params']:,} params) on {results['data']}, "
        f"{results['epochs']} epochs in {results['wall_time_s']:.1f}s",
        f"test  top-1 error {pct('test_err1')}   top-5 error {pct('test_err5')}   (final epoch)",
        f"val   top-1 error {pct('best_val_err1')} best (epoch {results.get('best_val_epoch')}), "
        f"{pct('final_val_err1')} final",
        f"run directory: {results['output_dir']}",
    ]
