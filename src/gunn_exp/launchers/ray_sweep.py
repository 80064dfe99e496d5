"""A sweep's jobs as Ray tasks, through hydra-ray-launcher's job runner: the refusals before any
job starts (ray_checks), at most `max_running` jobs at once (Ray's pattern for limiting pending
tasks; Ray places each one), every job's end collected so that a failed or crashed job does not
stop the others, the failed jobs listed at the end, and Ctrl-C stopping the running jobs at a
checkpoint.

The driver here does what hydra-ray-launcher's `launch` does (compose each job's config, submit it
with `launch_job_on_ray`), except that it does not stop at the first crashed worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from gunn_exp import cli
from gunn_exp.errors import ConfigError, Interrupted, JobFailed, first_line
from gunn_exp.launchers.ray_checks import (
    KEY,
    check_job,
    check_reachable,
    check_resources,
    import_ray,
)
from gunn_exp.launchers.ray_task import RayTask

if TYPE_CHECKING:
    from hydra_plugins.gunn_exp_launchers.ray_launcher import RayLauncher

log = logging.getLogger(__name__)

# Ray's token authentication (on by default for clusters since Ray 2.5x) is enabled in a driver
# only when it finds the cluster itself (address=auto); an explicit address needs it said.
CLUSTER_AUTH = (
    "A cluster with token authentication needs RAY_AUTH_MODE=token in this environment and its "
    "token (in ~/.ray/auth_token or RAY_AUTH_TOKEN; docs/CLUSTER.md)."
)

NOT_STARTED = "not started: the sweep was stopped"


@dataclass
class Job:
    """One job of the sweep: its number, overrides, composed config and directory; `own`: the
    overrides that set it apart from the batch's other jobs (what its report lines show)."""

    num: int
    overrides: list[str]
    config: DictConfig
    dir: str
    own: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return " ".join([f"#{self.num}", *self.own, f"({self.dir})"])


def launch(
    launcher: RayLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[JobReturn]:
    """Run one batch of the sweep's jobs on Ray; their JobReturns, failed ones included (the
    sweeper decides what a failure means: Hydra's basic sweeper stops after the batch, Optuna's
    records a failed trial)."""
    assert launcher.config is not None and launcher.hydra_context is not None
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    with cli.exits_on_error():
        ray = import_ray()
        jobs = compose_jobs(launcher, job_overrides, initial_job_idx)
        connect(ray, launcher.ray_cfg.init)
        accelerators = {str(OmegaConf.select(j.config, "trainer.accelerator")) for j in jobs}
        local = launcher.ray_cfg.init.get("address") in (None, "local")
        check_resources(ray.cluster_resources(), launcher.ray_cfg.remote, accelerators, local)
        sweep_dir = Path(str(launcher.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Ray launcher: {len(jobs)} jobs, sweep directory {sweep_dir}")
        returns = run_jobs(launcher, ray, jobs, sweep_dir)
    report_failures(jobs, returns, sweep_dir)
    return returns


def compose_jobs(
    launcher: RayLauncher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> list[Job]:
    """Every job of the batch, composed and checked before any starts."""
    jobs = [
        compose_job(launcher, list(overrides), initial_job_idx + i)
        for i, overrides in enumerate(job_overrides)
    ]
    shared = set.intersection(*(set(job.overrides) for job in jobs))
    for job in jobs:
        check_job(job.config, launcher.ray_cfg.remote)
        job.own = [o for o in filter_overrides(job.overrides) if o not in shared]
    return jobs


def compose_job(launcher: RayLauncher, overrides: list[str], num: int) -> Job:
    """The job's config, as hydra-ray-launcher composes it, and the directory it will write.

    The sweep directory is pinned to the one the driver resolved (and Hydra's sweeper created):
    a cluster's worker resolves the job's config where PROJECT_ROOT (`paths.log_dir`) and its
    working directory are the node's, so it would otherwise write elsewhere.
    """
    assert launcher.hydra_context is not None and launcher.config is not None
    config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, overrides)
    with open_dict(config):
        config.hydra.job.id = f"ray_job_{num}"
        config.hydra.job.num = num
        config.hydra.sweep.dir = str(Path(str(config.hydra.sweep.dir)).absolute())
    subdir = OmegaConf.select(config, "hydra.sweep.subdir", throw_on_resolution_failure=False)
    return Job(num, overrides, config, os.path.join(config.hydra.sweep.dir, str(subdir)))


def connect(ray: ModuleType, init: DictConfig) -> None:
    """Start the local Ray instance or join the cluster, once (Optuna launches several batches)."""
    if ray.is_initialized():
        return
    check_reachable(init.get("address"))
    kwargs = OmegaConf.to_container(init, resolve=True)
    try:
        ray.init(**{k: v for k, v in kwargs.items() if v is not None})
    except Exception as err:  # bad arguments, a cluster that refuses this driver, ...
        hint = "" if init.get("address") in (None, "local") else f" {CLUSTER_AUTH}"
        raise ConfigError(f"{KEY}.init: Ray could not start: {first_line(err)}.{hint}") from err


def run_jobs(
    launcher: RayLauncher, ray: ModuleType, jobs: list[Job], sweep_dir: Path
) -> list[JobReturn]:
    """Submit the jobs (at most `max_running` at a time) and collect every one's JobReturn."""
    from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray

    assert launcher.task_function is not None
    task = RayTask(launcher.task_function, script=os.path.abspath(sys.argv[0]))
    singleton = Singleton.get_state()
    waiting, running, returns = deque(jobs), {}, {}
    try:
        while waiting or running:
            while waiting and (not launcher.max_running or len(running) < launcher.max_running):
                job = waiting.popleft()
                log.info(f"\t#{job.num} : {' '.join(filter_overrides(job.overrides))}")
                ref = launch_job_on_ray(
                    launcher.hydra_context, launcher.ray_cfg.remote, job.config, task, singleton
                )
                running[ref] = job
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                job = running.pop(ref)
                returns[job.num] = job_return(ray, ref, job)
    except KeyboardInterrupt:
        stop_jobs(ray, running, returns)
        finished = sum(r.status is JobStatus.COMPLETED for r in returns.values())
        unplaced = sum(error_line(returns[job.num]) == NOT_STARTED for job in running.values())
        raise Interrupted(
            f"sweep stopped by Ctrl-C: {finished} of {len(jobs)} jobs finished, "
            f"{len(running) - unplaced} interrupted (lines above), {len(waiting) + unplaced} "
            f"never started. To finish it, run the same command with "
            f"hydra.sweep.dir={sweep_dir} ckpt_path=auto.",
            signal.SIGINT,
        ) from None
    return [returns[job.num] for job in jobs]


def stop_jobs(ray: ModuleType, running: dict[Any, Job], returns: dict[int, JobReturn]) -> None:
    """Ctrl-C: Ray interrupts each running job as Ctrl-C would (its graceful_stop saves
    last.ckpt after the current batch); submitted jobs Ray has not placed yet never start. A
    second Ctrl-C quits at once."""
    log.warning(
        f"Ctrl-C: stopping {len(running)} submitted jobs; each running one saves last.ckpt after "
        f"its current batch (Ctrl-C again quits at once)."
    )
    for ref in running:
        ray.cancel(ref)
    for ref, job in running.items():
        returns[job.num] = job_return(ray, ref, job)


def job_return(ray: ModuleType, ref: Any, job: Job) -> JobReturn:
    """The job's JobReturn; a job whose process died (killed, out of memory, its node lost) or
    that was cancelled before it started becomes a failed one."""
    try:
        ret: JobReturn = ray.get(ref)
    except ray.exceptions.RayError as err:
        ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
        ret.return_value = JobFailed(died(ray, err))
    if ret.status is JobStatus.FAILED:
        log.error(f"job {job.describe()} failed: {error_line(ret)}")
    return ret


def died(ray: ModuleType, err: Exception) -> str:
    """The line for a job Ray reports as lost."""
    if isinstance(err, ray.exceptions.TaskCancelledError):
        return NOT_STARTED
    if isinstance(err, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return (
            "its process died (killed, out of memory, or its node was lost); with "
            "ckpt_path=auto a rerun resumes it from its last checkpoint"
        )
    return f"{type(err).__name__}: {first_line(err)}"


def error_line(ret: JobReturn) -> str:
    # `return_value` re-raises a failure; the exception itself is the dataclass field.
    return str(ret._return_value)


def report_failures(jobs: list[Job], returns: list[JobReturn], sweep_dir: Path) -> None:
    """The sweep's last lines: every failed job with its line, and how to finish the sweep."""
    failed = [
        (job, ret) for job, ret in zip(jobs, returns, strict=True) if ret.status is JobStatus.FAILED
    ]
    if not failed:
        return
    log.error(f"{len(failed)} of {len(jobs)} jobs failed (the others ran to their end):")
    for job, ret in failed:
        log.error(f"  {job.describe()}: {error_line(ret)}")
    log.error(
        f"to rerun them, run the same command with hydra.sweep.dir={sweep_dir} ckpt_path=auto: "
        f"finished jobs are kept as they are, interrupted ones resume from their last checkpoint."
    )
