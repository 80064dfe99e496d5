"""What a Ray sweep refuses before any job starts, each as one ConfigError naming the value and the
fix: Ray not installed, a cluster address nothing answers at (Ray itself would retry for
minutes), and jobs that cannot run as one Ray task (DDP ranks, several devices) or whose GPU
share does not fit the config or the cluster."""

from __future__ import annotations

import logging
import socket
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gunn_exp.config import processes
from gunn_exp.errors import ConfigError

log = logging.getLogger(__name__)

KEY = "hydra.launcher.ray"
INSTALL = 'pip install -e ".[ray]"'
PROBE_TIMEOUT_S = 5.0
MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp", "deepspeed")
RAY_CLIENT_PORT = 10001  # ray://host without a port
START_ONE = (
    "Start one (`ray start --head` on its head node) and pass its address, or use "
    f"{KEY}.init.address=local for a Ray instance of this sweep on this machine."
)


def import_ray() -> ModuleType:
    """Ray, once Hydra's Ray launcher (whose job runner the sweep uses) is known to be there."""
    try:
        import hydra_plugins.hydra_ray_launcher._launcher_util  # noqa: F401
        import ray
    except ImportError as err:
        raise ConfigError(
            f"hydra/launcher=ray needs Ray and Hydra's Ray launcher ({err}): install them with "
            f"{INSTALL}, or drop hydra/launcher=ray to run the jobs one after another."
        ) from err
    return ray


def check_job(cfg: DictConfig, remote: DictConfig) -> None:
    """One job of the sweep: a single process (Lightning's DDP launcher re-runs the command that
    started it, which inside a Ray task is Ray's worker) on at most one GPU or a share of one."""
    strategy = OmegaConf.select(cfg, "trainer.strategy")
    if str(strategy).startswith(MULTI_PROCESS_STRATEGIES) or (processes(cfg) or 1) > 1:
        trainer = {
            k: OmegaConf.select(cfg, f"trainer.{k}", default=1) for k in ("devices", "num_nodes")
        }
        raise ConfigError(
            f"trainer.strategy={strategy} with trainer.devices={trainer['devices']}, "
            f"trainer.num_nodes={trainer['num_nodes']}: a job of hydra/launcher=ray is one "
            f"process on one device (DDP ranks cannot start inside a Ray task); run DDP jobs "
            f"with hydra/launcher=slurm or without hydra/launcher=ray (docs/CLUSTER.md)."
        )
    share = float(remote.get("num_gpus") or 0)
    if share > 1:
        raise ConfigError(
            f"{KEY}.remote.num_gpus={share:g}: a job trains on one device; give it one GPU (1) "
            f"or a share of one (0.5, 0.25, ...)."
        )
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator"))
    if share == 0 and accelerator in ("gpu", "cuda"):
        raise ConfigError(
            f"trainer.accelerator={accelerator} with {KEY}.remote.num_gpus=0: the jobs would get "
            f"no GPU; give each a share, e.g. {KEY}.remote.num_gpus=1 (a GPU per job) or 0.25 "
            f"(4 jobs per GPU)."
        )


def check_reachable(address: str | None) -> None:
    """Refuse within seconds a cluster address nothing answers at. `auto` (and RAY_ADDRESS) are
    resolved the way ray.init resolves them."""
    if address in (None, "local"):
        return
    if address.startswith("ray://"):
        target = address.removeprefix("ray://")
    else:
        from ray._private.services import canonicalize_bootstrap_address

        try:
            target = canonicalize_bootstrap_address(address)
        except ConnectionError as err:  # auto, and no cluster was started on this machine
            raise ConfigError(f"{KEY}.init.address={address}: {err} {START_ONE}") from err
        if target is None:
            return
    host, colon, port = target.rpartition(":")
    if not colon:
        host, port = target, str(RAY_CLIENT_PORT)
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{KEY}.init.address={address}: no Ray cluster answers at {target} ({err}). {START_ONE}"
        ) from err


def check_resources(
    cluster: dict[str, Any], remote: DictConfig, accelerators: set[str], local: bool
) -> None:
    """The jobs' resources against the cluster's: a job that needs more than the cluster has
    would wait forever (refused on a local instance, whose resources are fixed; a warning on a
    cluster, whose autoscaler may add nodes), and GPUs left idle by jobs that would pick the CPU."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    need_cpus, share = float(remote.get("num_cpus") or 0), float(remote.get("num_gpus") or 0)
    if share == 0 and gpus and accelerators & {"auto", "gpu", "cuda"}:
        raise ConfigError(
            f"the Ray cluster has {gpus:g} GPU(s) but {KEY}.remote.num_gpus=0 gives the jobs "
            f"none (they would train on CPUs): set e.g. {KEY}.remote.num_gpus=1 (a GPU per job) "
            f"or 0.25 (4 jobs per GPU), or trainer=cpu to train on CPUs."
        )
    if need_cpus <= cpus and share <= gpus:
        return
    message = (
        f"a job needs {need_cpus:g} CPU and {share:g} GPU ({KEY}.remote.num_cpus, num_gpus) "
        f"but the Ray cluster has {cpus:g} CPU and {gpus:g} GPU: no job could start"
    )
    if local:
        raise ConfigError(f"{message}; lower them, or raise {KEY}.init.num_cpus / num_gpus.")
    log.warning(f"{message} until nodes that have them join.")
