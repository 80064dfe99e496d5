"""Resuming: which file `ckpt_path` means, refusing a checkpoint that cannot resume this config
(other weights, or a config that trains differently), and the schedule of a resume that changed
the run's length or (on purpose) its recipe."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from torch import nn

from gunn_exp import rundir
from gunn_exp.errors import CheckpointError, ConfigError
from gunn_exp.rundir.checkpoint import (
    TRAINING_STATE,
    RunDescription,
    load_checkpoint,
    model_state,
)
from gunn_exp.rundir.configs import config_history, latest_config
from gunn_exp.rundir.weights import StateDiff, trained_as

log = logging.getLogger(__name__)


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
        last = rundir.checkpoint_path(run_dir, rundir.LAST)
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


def finished_results(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """For `ckpt_path=auto`: the results of a run that already finished in `run_dir` (results.json
    written, with this config's training values, tested if `test=true`); nothing is then run or
    written again. A sweep run again after an interruption so leaves its finished jobs as they
    are. Any other case (no such run, a changed config) takes the ordinary resume path."""
    results = run_dir / rundir.RESULTS
    if not cfg.train or not results.is_file():
        return None
    finished = rundir.read_results(results)
    if cfg.test and finished.get("test_err1") is None:
        return None
    before = OmegaConf.to_container(OmegaConf.load(latest_config(run_dir)), resolve=False)
    if config_changes(training_config(before), training_config(cfg)):
        return None
    log.info(f"{run_dir} has finished (its results.json): ckpt_path=auto leaves it as it is")
    return finished


def check_resume(cfg: DictConfig, ckpt_path: Path, model: nn.Module, run_dir: Path) -> bool:
    """Refuse a checkpoint that cannot resume `cfg`; returns whether `cfg` changes the training
    (allowed on purpose: then the schedule needs `ResumedSchedule`).

    Run before the training module is built and before anything is written into the run
    directory, so a refused resume leaves it as it was.
    """
    ckpt = load_checkpoint(ckpt_path)
    check_resumable(ckpt, ckpt_path, model, cfg.model.name)
    return check_config_change(cfg, ckpt, ckpt_path, run_dir)


def check_resumable(ckpt: dict[str, Any], path: Path, model: nn.Module, model_name: str) -> None:
    """Refuse a checkpoint that holds weights only or belongs to another model; the message
    names the model the checkpoint was trained as and the tensors that differ."""
    missing = [key for key in TRAINING_STATE if key not in ckpt]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} cannot resume training: it has no {', '.join(missing)} (weights "
            f"only). Use init_from={path} to start a new run from its weights."
        )
    diff = StateDiff.between(model, model_state(ckpt, path))
    if diff:
        source = trained_as(ckpt, path)
        written_by = f" It was written by a run of model {source}." if source else ""
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_name}: {diff}.{written_by} Resume "
            f"with the overrides of the run that wrote it (model=..., its model options)."
        )
    log.info(f"resuming from {path} (epoch {ckpt['epoch'] + 1}, step {ckpt['global_step']})")


# What a resume may not change silently: (group, keys that do not change training). Everything
# in these groups counts except the listed keys (I/O, speed, exact alternative implementations).
TRAINING_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("impl",),
    "data": ("data_dir", "download", "num_workers", "verify_checksums", "pin_memory", "ten_crop"),
    "optimizer": ("fused", "foreach"),
    "scheduler": (),
}
# Trainer flags that change training, with Lightning's default for a config that leaves one out
# (conf/trainer/default.yaml lists only lightning-hydra-template's keys; `+trainer.x=` adds one).
TRAINER_DEFAULTS: dict[str, Any] = {
    "trainer.max_epochs": None,
    "trainer.precision": "32-true",
    "trainer.accumulate_grad_batches": 1,
    "trainer.gradient_clip_val": None,
    "trainer.gradient_clip_algorithm": None,
    "trainer.limit_train_batches": None,
    "trainer.overfit_batches": 0.0,
}
TRAINING_KEYS = ("seed", *TRAINER_DEFAULTS)
# A new run length, and the schedule values that follow from it (`${trainer.max_epochs}` in
# conf/scheduler): what a user means by typing another trainer.max_epochs on a resume.
LENGTH_KEYS = ("trainer.max_epochs", "scheduler.T_max", "scheduler.milestones")
ALLOW_FLAG = "allow_config_change"


def training_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved values of `cfg` that decide how a run trains, as flat `a.b` keys."""
    container = cfg if isinstance(cfg, dict) else OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, Any] = {}
    for group, ignored in TRAINING_GROUPS.items():
        node = container.get(group)
        if not isinstance(node, dict):
            flat[group] = node  # e.g. scheduler: null
            continue
        flat.update({f"{group}.{k}": v for k, v in node.items() if k not in ignored})
    for key in TRAINING_KEYS:
        group, _, name = key.rpartition(".")
        node = container.get(group, {}) if group else container
        value = node.get(name) if isinstance(node, dict) else None
        flat[key] = TRAINER_DEFAULTS.get(key) if value is None else value
    return flat


def config_changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, run's value, new value) for every training value that differs."""
    return [
        (key, before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def check_config_change(
    cfg: DictConfig, ckpt: dict[str, Any], ckpt_path: Path, run_dir: Path
) -> bool:
    """Refuse a resume whose config trains differently from the one the checkpoint was trained
    with: the config inside the checkpoint, else (older checkpoints) the latest of its run's
    config history (rundir.configs), found beside the checkpoint or in `run_dir`.

    A new `trainer.max_epochs` (lightning-hydra-template's resume test: 1 epoch, then
    `trainer.max_epochs=2`) proceeds with one warning line saying how the schedule changes; the
    new config joins the run's config history (save_config). `allow_config_change=true` lets
    anything else be changed on purpose. Returns whether the config changes training (and so
    whether the schedule must follow the new config: `ResumedSchedule`).
    """
    described = RunDescription.from_checkpoint(ckpt, ckpt_path)
    source = rundir.find_run_dir(ckpt_path) or run_dir
    if described is not None and described.config:
        before, where = described.config, f"the config inside {ckpt_path.name}"
    elif history := config_history(source):
        before = OmegaConf.to_container(OmegaConf.load(history[-1]), resolve=False)
        where = history[-1].name
    else:
        log.warning(f"resuming from {ckpt_path}: no config of its run to compare with")
        return False
    old, new = training_config(before), training_config(cfg)
    changes = config_changes(old, new)
    if not changes:
        return False
    changed = {key for key, _, _ in changes}
    if "trainer.max_epochs" in changed and changed <= set(LENGTH_KEYS):
        log.warning(f"resuming {source}: {length_change(old, new)}")
        return True
    shown = ", ".join(f"{k}: run {old!r}, now {new!r}" for k, old, new in changes[:4])
    more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
    if cfg.get(ALLOW_FLAG, False):
        log.warning(f"resuming {source} with a changed config ({ALLOW_FLAG}): {shown}{more}")
        return True
    raise ConfigError(
        f"resuming {source} with a config that trains differently from {where}: "
        f"{shown}{more}. Resume with the run's values, or add {ALLOW_FLAG}=true to change the "
        f"run on purpose (the rest of the run then follows the new schedule; README 'Resuming')."
    )


def length_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """One line: the run's new length and what it does to the lr schedule (old -> new)."""
    line = f"trainer.max_epochs {old['trainer.max_epochs']} -> {new['trainer.max_epochs']}"
    schedule = str(new.get("scheduler._target_") or "").rpartition(".")[2]
    if "scheduler.T_max" in new:
        before, after = old["scheduler.T_max"], new["scheduler.T_max"]
        return f"{line}; {schedule} lr over {before} -> {after} epochs"
    if "scheduler.milestones" in new:
        # MultiStepLR counts scheduler steps from 0: milestone m drops the lr from epoch m + 1.
        before, after = ([m + 1 for m in c["scheduler.milestones"]] for c in (old, new))
        return f"{line}; {schedule} lr x{new['scheduler.gamma']} from epochs {before} -> {after}"
    if schedule:
        return f"{line}; the {schedule} lr schedule does not depend on the run's length"
    return f"{line}; constant lr"


class ResumedSchedule(pl.Callback):
    """After a resume that changed the recipe on purpose: the remaining epochs follow the new one.

    Lightning restores the optimizer and scheduler from the checkpoint, hyper-parameters
    included (a cosine schedule keeps its old T_max and would rise again past it). Here the
    new config's scheduler options (T_max, milestones, gamma, ...) and optimizer options (lr,
    weight_decay, momentum) replace the restored ones, and the current lr is recomputed in
    closed form at the epoch reached: epoch e of the resumed run gets the lr the new schedule
    gives epoch e. Only added when the config changed (a plain resume stays bit-exact).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizer_options = getattr(pl_module.optimizer_factory, "keywords", {})
        scheduler_options = getattr(pl_module.scheduler_factory, "keywords", {})
        changed = False
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key, value in optimizer_options.items():
                    # Not lr: the group holds the scheduled lr; the base lr is initial_lr.
                    if key in group and key not in ("params", "lr") and group[key] != value:
                        group[key], changed = value, True
                if "lr" in optimizer_options and group.get("initial_lr") != optimizer_options["lr"]:
                    group["initial_lr"], changed = optimizer_options["lr"], True
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            for key, value in scheduler_options.items():
                new = Counter(value) if key == "milestones" else value
                if callable(value) or not hasattr(scheduler, key):
                    continue
                if getattr(scheduler, key) != new:
                    setattr(scheduler, key, new)
                    changed = True
            if not changed:
                continue  # same recipe (e.g. only trainer.max_epochs grew): keep the exact state
            scheduler.base_lrs = [g["initial_lr"] for g in scheduler.optimizer.param_groups]
            closed_form = getattr(scheduler, "_get_closed_form_lr", None)
            lrs = closed_form() if closed_form else scheduler.get_lr()
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = list(lrs)
            log.info(f"resumed schedule: epoch {trainer.current_epoch + 1} at lr {lrs[0]:.4g}")
