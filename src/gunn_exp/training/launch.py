"""Where a run's processes come from, and keeping all ranks of a run in one run directory.

Lightning's DDP launcher starts ranks 1..N-1 by re-running `sys.argv`, with the run directory
pinned by `hydra.run.dir=`. Inside a Hydra multirun that argv is the whole sweep (`-m` and every
value), so each extra rank would run the entire sweep again into a second sweep directory, and
later jobs of the sweep would inherit the first job's rank variables. A multirun job that would
launch its own ranks therefore runs as a single run in a fresh process (its overrides, its job
directory), where Lightning's launcher is correct; so does a run of `train(cfg)` called from
Python, whose argv is not train.py at all. Jobs whose ranks are started by the cluster
(hydra/launcher=slurm: one SLURM task per rank) need none of this.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_original_cwd
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from gunn_exp import rundir
from gunn_exp.config import in_multirun
from gunn_exp.errors import ConfigError, Interrupted, RunStopped

log = logging.getLogger(__name__)

RANK_RESULTS = ("epochs", "test_err1", "test_err5", "test_loss", "best_val_err1", "final_val_err1")


def launches_own_ranks(trainer: pl.Trainer) -> bool:
    """Whether `trainer.fit` would start this run's other processes itself."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and env is not None and not env.creates_processes_externally


# Lightning strategies whose ranks run `fit` in processes forked or spawned from this one.
CHILD_PROCESS_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook")
SPAWN_METHODS = ("spawn", "fork", "forkserver")


def with_script_ranks(cfg: DictConfig) -> DictConfig:
    """`cfg` with a strategy that trains in child processes (ddp_spawn, ddp_fork, ddp_notebook,
    a DDPStrategy with `start_method: spawn|fork|forkserver`) replaced by its `ddp` form.

    Their ranks run `fit` in processes started from this one and only the weights come back:
    the per-epoch rows, the best epoch and the epoch count would stay in the children, and
    results.json would describe a run that never trained. `ddp` trains the same (the same
    processes, seeds and gradient averaging) with ranks that are scripts of their own, where
    rank 0 keeps its state. lightning-hydra-template's `ddp_sim` and its tests use ddp_spawn,
    so it is translated rather than refused; one line says so. `cfg` itself is left as it was.
    """
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if isinstance(strategy, str) and strategy.startswith(CHILD_PROCESS_STRATEGIES):
        _, option, value = strategy.partition("_find_unused_parameters")
        old, new = strategy, "ddp" + option + value
    elif isinstance(strategy, DictConfig) and strategy.get("start_method") in SPAWN_METHODS:
        old, new = f"start_method={strategy.start_method}", "start_method=popen"
    else:
        return cfg
    cfg = copy.deepcopy(cfg)
    if isinstance(strategy, str):
        cfg.trainer.strategy = new
    else:
        cfg.trainer.strategy.start_method = "popen"
    if rank_zero_only.rank == 0:  # once per run, not once per rank
        log.info(
            f"trainer.strategy: {old} trains in child processes that keep the run's results to "
            f"themselves; training with {new} instead (the same training, ranks as processes of "
            f"their own)."
        )
    return cfg


def check_rank_run_dirs(trainer: pl.Trainer) -> None:
    """Refuse ranks started outside Lightning (torchrun, srun) without a shared `hydra.run.dir`.

    Each such rank composes its own config, and the default run directory contains the start
    time, so the ranks of one run could write into different directories.
    """
    if trainer.world_size == 1 or not HydraConfig.initialized() or in_multirun():
        return
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None or not (env.creates_processes_externally or trainer.num_nodes > 1):
        return
    if any(o.lstrip("+").startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
        return
    raise ConfigError(
        "the ranks of this run are started one by one (torchrun, srun or one command per node), "
        "so each needs the same run directory: add hydra.run.dir=<dir>, e.g. "
        "hydra.run.dir=logs/train/runs/$SLURM_JOB_ID (see docs/CLUSTER.md)."
    )


def run_job_as_single_run(output_dir: Path, wandb_group: str | None = None) -> dict[str, Any]:
    """Run this multirun job in a fresh `python train.py <job overrides>` process; its results.

    The child writes into the job's directory (`hydra.run.dir`) and leaves the job's `.hydra/`
    as the sweep wrote it. `wandb_group`: the sweep's wandb group, which the child (a single run)
    cannot know itself.
    """
    hydra_cfg = HydraConfig.get()
    command = [
        *_entry_command(),
        *hydra_cfg.overrides.task,
        f"hydra.run.dir={_quoted(output_dir)}",
        "hydra.output_subdir=null",
        "hydra.mode=RUN",  # a sweep config (hparams_search=...) must not start a sweep again
        *([f"logger.wandb.group={_quoted(wandb_group)}"] if wandb_group else []),
    ]
    job = f"multirun job {hydra_cfg.job.num}"
    log.info(f"{job} starts DDP ranks: running it as a single run: {shlex.join(command)}")
    resume = f"`ckpt_path=last hydra.run.dir={output_dir}` and the job's overrides (its .hydra/)"
    return _run_child(command, job, resume, get_original_cwd(), output_dir)


def run_config_as_script(config_file: Path, root_dir: Path, output_dir: Path) -> dict[str, Any]:
    """Run this run in a fresh `python train.py` process composed from its saved `config_file`;
    its results.

    For `train(cfg)` called from Python (a test, a notebook, lightning-hydra-template's
    `test_train_ddp_sim`) with a strategy whose ranks Lightning starts itself: its launcher
    re-runs this process's command line for each rank, which is not train.py here. The saved
    config holds every change the caller made after composing, which overrides would not.
    """
    # paths.root_dir (PROJECT_ROOT), else the checkout this package is imported from (src/).
    found = [p for p in (root_dir, Path(__file__).parents[3]) if (p / "train.py").is_file()]
    if not found:
        raise ConfigError(
            f"this run starts DDP ranks as `python train.py`, and neither paths.root_dir="
            f"{root_dir} nor {Path(__file__).parents[3]} has train.py: set PROJECT_ROOT to the "
            f"project folder, or start the run with `python train.py ...`."
        )
    script = found[0].resolve() / "train.py"
    command = [
        sys.executable,
        str(script),
        f"--config-path={config_file.parent.resolve()}",
        f"--config-name={config_file.name}",
        f"hydra.run.dir={_quoted(output_dir.resolve())}",
        "hydra.output_subdir=null",
    ]
    log.info(f"this run starts DDP ranks: running it as `python train.py`: {shlex.join(command)}")
    resume = f"`ckpt_path=last` in the same run directory ({output_dir})"
    return _run_child(command, "this DDP run", resume, Path.cwd(), output_dir)  # paths as here


def _run_child(
    command: list[str], what: str, resume: str, cwd: Path | str, output_dir: Path
) -> dict[str, Any]:
    """Run `command` to its end with SIGTERM/SIGINT forwarded (it checkpoints and stops); the
    results it wrote. It is in its own session so a terminal's Ctrl-C reaches it once, through
    this process."""
    child = subprocess.Popen(command, cwd=cwd, start_new_session=True)
    forwarded: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            forwarded[signum] = signal.signal(signum, lambda s, _: child.send_signal(s))
    try:
        code = child.wait()
    finally:
        for signum, handler in forwarded.items():
            signal.signal(signum, handler)
    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        raise Interrupted(f"{what} stopped by signal {signum}; resume it with {resume}.", signum)
    if code != 0:
        raise RunStopped(f"{what} failed with exit code {code} (its messages are above).", code)
    return rundir.read_results(output_dir / rundir.RESULTS)


def log_rank_results(trainer: pl.Trainer, results: dict[str, Any]) -> None:
    """One line per rank with its final numbers: all ranks of a DDP run must agree."""
    if trainer.world_size > 1:
        numbers = {k: results.get(k) for k in RANK_RESULTS}
        log.info(f"rank {trainer.global_rank}/{trainer.world_size} results: {json.dumps(numbers)}")


def _entry_command() -> list[str]:
    """How this program was started (`python train.py` or `python -m ...`), absolute."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name]
    return [sys.executable, os.path.join(get_original_cwd(), sys.argv[0])]


def _quoted(path: Path | str) -> str:
    """`path` as a quoted Hydra override value (any character allowed)."""
    escaped = str(path).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
