"""`hydra/launcher=ray` (conf/hydra/launcher/ray.yaml): the class Hydra instantiates. Imports
nothing heavy: Hydra imports every plugin module at each start of every script."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class RayLauncher(Launcher):
    """Runs a sweep's jobs as Ray tasks through hydra-ray-launcher (`gunn_exp.launchers.ray_sweep`).

    `ray`: `init` (ray.init's arguments) and `remote` (each job's ray.remote arguments), as in
    hydra-ray-launcher's own config; `max_running`: jobs running at once, at most.
    """

    def __init__(self, ray: DictConfig, max_running: int | None = None) -> None:
        self.ray_cfg = ray
        self.max_running = max_running
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from gunn_exp.launchers.ray_sweep import launch

        return launch(self, job_overrides, initial_job_idx)


def drop_plugin_schema() -> None:
    """conf/hydra/launcher/ray.yaml replaces hydra-ray-launcher's own `ray` config (this launcher,
    its keys). Left in Hydra's ConfigStore, the plugin's config would become the file's schema
    (Hydra's deprecated automatic schema matching): a warning at every start, `max_running`
    refused. The plugin registers it when its `_config` module first runs, which is here or
    earlier in Hydra's plugin scan, and never again."""
    try:
        import hydra_plugins.hydra_ray_launcher._config  # noqa: F401
    except ImportError:  # not installed: nothing to replace
        return
    ConfigStore.instance().repo.get("hydra", {}).get("launcher", {}).pop("ray.yaml", None)


drop_plugin_schema()
