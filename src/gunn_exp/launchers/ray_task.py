"""What runs inside each Ray task of a sweep: the entry script's preamble, the run kept on the share
of the machine Ray assigned it, and its end turned into a result the sweep can list.

A Ray task that exits its process (train.py ends every error with `sys.exit`) reaches the driver
as a crashed worker with no message, so the exit becomes a `JobFailed` carrying the job's line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from hydra.types import TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from gunn_exp import cli
from gunn_exp.errors import JobFailed, exit_code, first_line, one_line

log = logging.getLogger(__name__)

# Accelerators under which a job trains on the GPU Ray assigned it.
GPU_ACCELERATORS = ("auto", "gpu", "cuda")


@dataclass(frozen=True)
class RayTask:
    """The entry script's task function as each Ray task runs it (a fresh process per job).

    `script`: the entry script (train.py), whose preamble (`cli.prepare`: PROJECT_ROOT, the config
    resolvers) ran in the driver only; a cluster's workers get the driver's PROJECT_ROOT from it
    unless their environment sets one.
    """

    task_function: TaskFunction
    script: str

    def __call__(self, cfg: DictConfig) -> Any:
        cli.prepare(self.script)
        place(cfg)
        quiet_progress(cfg)
        # Ray's workers turn SIGTERM into an immediate sys.exit(1); a job stops as a run does
        # (graceful_stop: last.ckpt after the current batch, then its `stopped:` line).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            return self.task_function(cfg)
        except SystemExit as stop:
            raise JobFailed(exit_line(stop)) from None
        except JobFailed:
            raise  # train.py's own end of a failed sweep job: its line, already printed
        except Exception as err:
            # A traceback does not survive the trip to the driver: log it here, into the job's
            # log file (and, through Ray, the driver's console).
            log.exception("the job failed:")
            raise JobFailed(
                f"{type(err).__name__}: {first_line(err)} (traceback in the job's .log file)"
            ) from None
        finally:
            # Ray kills a worker's child processes as the worker ends (after every job), which
            # can be before wandb's atexit hook has let its service process write out the run
            # (seen: an empty run file). End wandb while the job still runs.
            if (wandb := sys.modules.get("wandb")) is not None:
                wandb.teardown()


def place(cfg: DictConfig) -> None:
    """Keep this job on what Ray assigned it. torch's threads follow its CPUs. With a GPU share,
    Ray has made only its GPU visible (CUDA_VISIBLE_DEVICES) and `trainer.devices` follows; with
    none, no GPU is visible, so two jobs never both take every GPU."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))
    gpus = ray.get_gpu_ids()
    if not gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA in this process
    elif str(OmegaConf.select(cfg, "trainer.accelerator")) in GPU_ACCELERATORS:
        cfg.trainer.devices = len(gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    log.info(
        f"ray: {cpus:g} CPU ({torch.get_num_threads()} torch threads), GPU "
        f"{'none' if visible == '' else visible or 'all (CUDA_VISIBLE_DEVICES unset)'}"
    )


def quiet_progress(cfg: DictConfig) -> None:
    """No progress bar: Ray forwards every job's console to the driver's, where the bars of
    jobs running at once would interleave. Each job still logs a line per epoch."""
    with open_dict(cfg):
        cfg.trainer.enable_progress_bar = False
    callbacks = cfg.get("callbacks") or {}
    for name in [
        n for n, c in callbacks.items() if c and str(c.get("_target_")).endswith("ProgressBar")
    ]:
        callbacks[name] = None


def exit_line(stop: SystemExit) -> str:
    """The line a job printed as it exited: `cli.exits_on_error` exits while handling the error
    it printed, which is therefore the exit's context."""
    cause = stop.__context__
    if cause is not None and exit_code(cause) == stop.code:
        return one_line(cause)
    return f"exited with status {stop.code}"
