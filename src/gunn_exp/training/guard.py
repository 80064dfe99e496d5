"""What surrounds a run's work, as lightning-hydra-template's `task_wrapper`: the run directory's
lock, one line for a full disk wherever the write failed (the lock's own file included) and for
a config value Lightning refuses only once fit starts, the wandb run closed either way, and the
run's records (Hydra's `.hydra/`, the log file) written only once the run is accepted, so a
refused run leaves its run directory as it was."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp import rundir
from gunn_exp.errors import DiskFull
from gunn_exp.rundir.checkpoint import checkpoint_position
from gunn_exp.rundir.configs import save_hydra_record
from gunn_exp.rundir.lock import RunLock
from gunn_exp.rundir.runlog import release_held_lines
from gunn_exp.training.checks import lightning_config_error
from gunn_exp.training.loggers import finish_wandb_run


@contextmanager
def run_guard(output_dir: Path) -> Iterator[None]:
    """Lock `output_dir` while the run writes into it (rank 0 holds the lock; the other ranks of
    a DDP run write into the same run on purpose), turn a full disk into `DiskFull` saying which
    checkpoint is intact, and end this process's wandb run."""
    failed = True
    try:
        with RunLock(output_dir) if rank_zero_only.rank == 0 else nullcontext():
            yield
        failed = False
    except Exception as err:  # a full disk, wherever the write was (ours or a library's)
        if (config_error := lightning_config_error(err)) is not None:
            raise config_error from err
        cause = rundir.out_of_space(err)
        if cause is None:
            raise
        path = err.path if isinstance(err, DiskFull) else cause.filename or output_dir
        free = shutil.disk_usage(output_dir).free
        raise DiskFull(str(path), free, intact_checkpoint_note(output_dir)) from err
    finally:
        finish_wandb_run(failed)


def accept_run(cfg: DictConfig, output_dir: Path) -> None:
    """The run passed every pre-run check: write its records, held back until now.

    Hydra writes `.hydra/` (config.yaml, hydra.yaml, overrides.yaml) before the task starts, and
    its log file takes every line from the start; conf/hydra/default.yaml turns both off
    (`output_subdir: null`, the `held` log handler: rundir.runlog) and here rank 0 writes the
    same `.hydra/` files and every process releases the lines held so far. A launcher that chose
    the output subdir itself (Lightning's DDP ranks, a multirun job run as a single run: both
    set `hydra.output_subdir=null`) gets no record from here, as from Hydra.
    """
    if HydraConfig.initialized() and rank_zero_only.rank == 0:
        hydra = HydraConfig.get()
        if not any(o.startswith("hydra.output_subdir=") for o in hydra.overrides.hydra):
            save_hydra_record(output_dir, cfg, HydraConfig.instance().cfg, hydra.overrides.task)
    release_held_lines()


def intact_checkpoint_note(run_dir: Path) -> str:
    """What survives a failed write: the last checkpoint (atomic writes leave it whole)."""
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    if not last.is_file():
        return "no checkpoint was written yet; free space and start the run again."
    return (
        f"{last} is intact ({checkpoint_position(last)}); free space and resume with "
        f"`ckpt_path=last hydra.run.dir={run_dir}` and the run's overrides."
    )
