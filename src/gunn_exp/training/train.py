"""train(cfg): build data, model and trainer from a Hydra config, fit, test, write the results.

The story reads top-down in `_train`; what surrounds it (pre-run refusals, the console extras, the
run directory's lock and failure handling) stays outside it, as lightning-hydra-template's
`extras` and `task_wrapper` do.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

from gunn_exp import rundir
from gunn_exp.config import in_multirun, without_hydra
from gunn_exp.data import ImageDataModule
from gunn_exp.errors import instantiate_config, refusing
from gunn_exp.extras import apply_extras
from gunn_exp.rundir.checkpoint import load_checkpoint
from gunn_exp.rundir.configs import save_config
from gunn_exp.rundir.weights import init_from_checkpoint, load_weights
from gunn_exp.task import ClassificationModule
from gunn_exp.training.callbacks import EpochSummary
from gunn_exp.training.checkpoints import (
    AtomicCheckpointIO,
    DescribeCheckpoints,
    ResumeAsInPlace,
)
from gunn_exp.training.checks import check_run, refuse_a_second_run
from gunn_exp.training.console import summary_lines
from gunn_exp.training.guard import accept_run, run_guard
from gunn_exp.training.launch import (
    check_rank_run_dirs,
    launches_own_ranks,
    log_rank_results,
    run_config_as_script,
    run_job_as_single_run,
    with_script_ranks,
)
from gunn_exp.training.loggers import build_loggers, log_run_setup, wandb_group
from gunn_exp.training.resume import (
    ResumedSchedule,
    check_resume,
    finished_results,
    resolve_ckpt_path,
)

log = logging.getLogger(__name__)

# The config tree shown at the start (extras.print_config).
CONFIG_TREE = ("data", "model", "optimizer", "scheduler", "trainer", "seed")


def train(cfg: DictConfig, from_command_line: bool = False) -> dict[str, Any]:
    """Fit `cfg.model` on `cfg.data`, test the final weights, return (and save) the results.

    `train=false` (with `ckpt_path=<file>`) only tests that checkpoint; `test=false` skips the
    test set; `ckpt_path=auto` on a finished run returns its results untouched. The run
    directory is locked while this process writes into it. `cfg` may carry its `hydra` node (a
    config composed as lightning-hydra-template's tests do): it is set aside.
    `from_command_line`: this process is `train.py` started with the command line that composed
    `cfg` (train.py's own call), which Lightning's DDP launcher may re-run for the other ranks;
    called from Python, a run with such ranks trains in a fresh train.py process (launch.py).
    """
    cfg = with_script_ranks(without_hydra(cfg))
    check_run(cfg)
    apply_extras(cfg, CONFIG_TREE)
    output_dir = Path(cfg.paths.output_dir)
    if cfg.ckpt_path == "auto" and (finished := finished_results(cfg, output_dir)) is not None:
        return finished
    with run_guard(output_dir):
        return _train(cfg, output_dir, from_command_line)


def _train(cfg: DictConfig, output_dir: Path, from_command_line: bool) -> dict[str, Any]:
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    resuming = ckpt_path is not None and bool(cfg.train)
    if cfg.train and ckpt_path is None:
        refuse_a_second_run(output_dir)

    datamodule: ImageDataModule = instantiate_config(cfg.data, "data")
    datamodule.check()  # bad data stops here, before the Trainer launches any process
    model = build_network(cfg)
    # Before the module is built and anything is written: a refused resume changes nothing.
    changed = check_resume(cfg, ckpt_path, model, output_dir) if resuming else False
    tested_ckpt = load_tested_weights(cfg, model, ckpt_path) if not cfg.train else None
    module = build_module(cfg, model)
    config_file = save_config(cfg, output_dir, resuming) if rank_zero_only.rank == 0 else None
    accept_run(cfg, output_dir)  # refusals are behind us: .hydra/ and the log file now

    resume_as_in_place = ResumeAsInPlace()
    trainer, loggers = build_trainer(cfg, output_dir, changed, resume_as_in_place)
    if launches_own_ranks(trainer) and in_multirun():
        # See launch.py: DDP inside a multirun. The sweep's wandb group goes along.
        group = wandb_group(cfg) if OmegaConf.select(cfg, "logger.wandb._target_") else None
        return run_job_as_single_run(output_dir, wandb_group=group)
    if launches_own_ranks(trainer) and not from_command_line and config_file is not None:
        return run_config_as_script(config_file, Path(cfg.paths.root_dir), output_dir)
    check_rank_run_dirs(trainer)
    log_run_setup(loggers, cfg, count_params(model))

    start = time.perf_counter()
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    wall_time = time.perf_counter() - start
    # The last epoch's values (trainer.test starts a new set); the resumed checkpoint's when fit
    # ran no epoch (a run killed during its final test, resumed).
    fitted = resume_as_in_place.fit_metrics(trainer)
    # The final weights are tested (the best epoch's validation error is reported beside them).
    tested = trainer.test(module, datamodule=datamodule, verbose=False)[0] if cfg.test else {}

    results = collect_results(cfg, trainer, module, fitted, tested, wall_time, tested_ckpt)
    if trainer.is_global_zero:
        rundir.write_results(results, output_dir)
        for line in summary_lines(results):
            log.info(line)
    log_rank_results(trainer, results)
    return results


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def load_tested_weights(cfg: DictConfig, model: nn.Module, ckpt_path: Path) -> dict[str, Any]:
    """`train=false`: the checkpoint to test, loaded into `model` (refused if another model)."""
    ckpt = load_checkpoint(ckpt_path)
    load_weights(model, ckpt, ckpt_path, cfg.model.name)
    return {"path": str(ckpt_path), "epochs": ckpt.get("epoch", -1) + 1}


def collect_results(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: ClassificationModule,
    fitted: dict[str, float],
    tested: dict[str, float],
    wall_time: float,
    tested_ckpt: dict[str, Any] | None,
) -> dict[str, Any]:
    """`results.json`: what the run was and how well it did (errors in percent)."""
    results = {
        "model": cfg.model.name,
        "data": cfg.data.name,
        "seed": cfg.seed,
        "params": count_params(module.model),
        "epochs": tested_ckpt["epochs"] if tested_ckpt else trainer.current_epoch,
        "wall_time_s": round(wall_time, 2),
        "test_err1": tested.get("test/err1"),
        "test_err5": tested.get("test/err5"),
        "test_loss": tested.get("test/loss"),
        "best_val_err1": module.best_val_err1,
        "best_val_epoch": int(module.best_val_epoch) or None,
        "final_val_err1": fitted.get("val/err1"),
        "final_val_err5": fitted.get("val/err5"),
        # What makes runs of one model and data differ beyond the seed (report.py groups by it).
        "gunnify": _gunnify(cfg),
        "train_fraction": OmegaConf.select(cfg, "data.train_fraction", default=1.0),
        "output_dir": cfg.paths.output_dir,
        "tags": list(cfg.tags),
        # Every metric by its logged name: what optimized_metric selects from.
        "metrics": {**fitted, **tested},
    }
    if tested_ckpt:
        results["ckpt_path"] = tested_ckpt["path"]
    return results


def _gunnify(cfg: DictConfig) -> dict[str, Any] | None:
    """The model's gunnify options when it is gunnified (models/gunnify.py), else None."""
    options = OmegaConf.select(cfg, "model.gunnify")
    if options is None or options.get("segments") is None:
        return None
    return OmegaConf.to_container(options, resolve=True)  # type: ignore[return-value]


def build_network(cfg: DictConfig) -> nn.Module:
    """The network of `cfg.model`; with `init_from`, started from another run's weights."""
    model: nn.Module = instantiate_config(cfg.model, "model")
    if cfg.init_from:  # fine-tuning: all but a classifier of another shape (rundir.weights)
        init_from_checkpoint(model, cfg.init_from, cfg.model.name)
    log.info(f"model {cfg.model.name}: {count_params(model):,} parameters")
    return model


def build_module(cfg: DictConfig, model: nn.Module) -> ClassificationModule:
    """The LightningModule: the network with the recipe's optimizer and schedule."""
    optimizer = instantiate_config(cfg.optimizer, "optimizer")
    scheduler = instantiate_config(cfg.scheduler, "scheduler") if cfg.scheduler else None
    # Built once here on the network's parameters (SGD and its schedules keep no state until a
    # step), so that an argument they refuse stops the run before anything is written, not
    # inside trainer.fit. Lightning builds the ones it trains with in configure_optimizers.
    with refusing("optimizer"):
        trial = optimizer(params=model.parameters())
    if scheduler is not None:
        with refusing("scheduler"):
            scheduler(optimizer=trial)
    return ClassificationModule(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        ten_crop_reduce=cfg.ten_crop_reduce,
    )


def build_trainer(
    cfg: DictConfig, output_dir: Path, resumed_schedule: bool, resume_as_in_place: ResumeAsInPlace
) -> tuple[pl.Trainer, list[Any]]:
    """The Trainer with the config's callbacks and loggers, plus what every run has whatever its
    callbacks (`callbacks=none` included): the per-epoch record (metrics.csv, curves.png; first,
    so its epoch time leaves out the probes of callbacks listed after it) and checkpoints that
    describe the run, written atomically, read safely and resumed as in place."""
    record = EpochSummary(
        str(output_dir), title=f"{cfg.model.name} on {cfg.data.name}, seed {cfg.seed}"
    )
    callbacks = [record] + [
        instantiate_config(conf, f"callbacks.{name}")
        for name, conf in (cfg.callbacks or {}).items()
        if conf and "_target_" in conf
    ]
    callbacks += [DescribeCheckpoints(cfg, output_dir), resume_as_in_place]
    if resumed_schedule:
        callbacks.append(ResumedSchedule())
    loggers = build_loggers(cfg, output_dir)
    trainer: pl.Trainer = instantiate_config(
        cfg.trainer,
        "trainer",
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    return trainer, loggers
