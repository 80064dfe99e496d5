"""train(cfg): build data, model and trainer from a Hydra config, fit, test, write the results."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp.callbacks import EpochSummary
from gunn_exp.checkpointing import AtomicCheckpointIO
from gunn_exp.config import print_config, save_config, validate_config
from gunn_exp.data import ImageDataModule
from gunn_exp.launch import (
    check_rank_run_dirs,
    in_multirun,
    launches_own_ranks,
    log_rank_results,
    run_job_as_single_run,
)
from gunn_exp.loggers import log_curves, log_run_setup, wandb_group
from gunn_exp.module import ClassificationModule
from gunn_exp.preprocessing import Preprocessing
from gunn_exp.results import summary_lines, write_results
from gunn_exp.resume import check_resumable, resolve_ckpt_path, wandb_resume_kwargs
from gunn_exp.weights import init_from_checkpoint

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
    """Fit `cfg.model` on `cfg.data`, test the final weights, return (and save) the results."""
    validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("print_config", True):
        print_config(cfg, ["data", "model", "optimizer", "scheduler", "trainer", "seed"])
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)

    datamodule: ImageDataModule = instantiate(cfg.data)
    datamodule.check()  # bad data stops here, before the Trainer launches any process
    model: torch.nn.Module = instantiate(cfg.model)
    if cfg.get("init_from"):  # fine-tuning: start from another run's weights (weights.py)
        init_from_checkpoint(model, cfg.init_from, cfg.model.name)
    params = sum(p.numel() for p in model.parameters())
    log.info(f"model {cfg.model.name}: {params:,} parameters")
    module = ClassificationModule(
        model=model,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        channels_last=cfg.get("channels_last", False),
        compile=cfg.get("compile", False),
        compile_mode=cfg.get("compile_mode"),
    )
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if ckpt_path is not None:  # before anything is written: a refused resume changes nothing
        check_resumable(ckpt_path, model, cfg.model.name)
    if rank_zero_only.rank == 0:
        save_config(cfg, output_dir / "config.yaml")
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(
        cfg.get("logger"), group=wandb_group(cfg), **wandb_resume_kwargs(cfg, output_dir)
    )
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    if in_multirun() and launches_own_ranks(trainer):
        return run_job_as_single_run(output_dir)  # see launch.py: DDP inside a multirun
    check_rank_run_dirs(trainer)
    log_run_setup(loggers, cfg, params)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    wall_time = time.perf_counter() - start
    # The final weights are tested (the best epoch's validation error is reported beside them).
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]

    rows = next((cb.rows for cb in callbacks if isinstance(cb, EpochSummary)), [])
    val_rows = [r for r in rows if "val/err1" in r]
    best = min(val_rows, key=lambda r: r["val/err1"], default=None)
    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.get("seed"),
        "params": params,
        "epochs": trainer.current_epoch,
        "wall_time_s": round(wall_time, 2),
        "test_err1": test.get("test/err1"),
        "test_err5": test.get("test/err5"),
        "test_loss": test.get("test/loss"),
        "best_val_err1": best["val/err1"] if best else None,
        "best_val_epoch": int(best["epoch"]) if best else None,
        "final_val_err1": val_rows[-1]["val/err1"] if val_rows else None,
        "final_val_err5": val_rows[-1].get("val/err5") if val_rows else None,
        "output_dir": str(output_dir),
        "tags": list(cfg.get("tags") or []),
    }
    if trainer.is_global_zero:
        # Class names let a run directory classify images on its own (see classify.py).
        (output_dir / "classes.json").write_text(json.dumps(list(datamodule.classes)))
        Preprocessing.from_datamodule(datamodule).save(output_dir)
        write_results(results, output_dir)
        log_curves(loggers, output_dir / "curves.png")
        for line in summary_lines(results):
            log.info(line)
    log_rank_results(trainer, results)
    return results
