"""A run's config history: the resolved config it started with and every resume that changed it.

    <run>/config.yaml             the resolved config the run started with (never overwritten)
    <run>/config.resume-<N>.yaml  the config of the N-th resume, when it differs
    <run>/.hydra/                 Hydra's record of the latest start: the composed config
                                  (unresolved), Hydra's own config and the command-line overrides

Configs are read as data only: nothing here instantiates a `_target_` (see rundir.build for the
one place that builds objects from a stored config, and what it allows).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gunn_exp.errors import RunError
from gunn_exp.rundir.files import CONFIG, HYDRA_RECORD, RESUME_CONFIG, atomic_write, find_run_dir

if TYPE_CHECKING:
    from omegaconf import DictConfig


def run_model_name(path: str | Path) -> str | None:
    """The model name in the config.yaml of the run that `path` belongs to, if there is one."""
    from omegaconf import OmegaConf

    run_dir = find_run_dir(path)
    if run_dir is None:
        return None
    return OmegaConf.select(read_config(run_dir), "model.name")


def read_config(run_dir: str | Path) -> DictConfig:
    """The run's latest config (`latest_config`), refused in one line when it is not a readable
    run config (a YAML error from an edit, a truncated copy) rather than with the parser's
    traceback."""
    from omegaconf import DictConfig, OmegaConf

    path = latest_config(run_dir)
    fix = (
        f"Fix: restore it from a copy of the run, or rewrite it from {run_dir}/.hydra/config.yaml "
        f"(the unresolved config Hydra saved)."
    )
    try:
        config = OmegaConf.load(path)
    except Exception as err:  # yaml.YAMLError, UnicodeDecodeError, ...
        where = " ".join(str(err).split())
        raise RunError(f"{path} is not valid YAML ({type(err).__name__}: {where}). {fix}") from err
    name = OmegaConf.select(config, "model.name") if isinstance(config, DictConfig) else None
    if not name:
        raise RunError(f"{path} has no model.name, so it is not a train.py run config. {fix}")
    return config


def config_history(run_dir: str | Path) -> list[Path]:
    """The run's configs, oldest first: config.yaml, then config.resume-1.yaml, -2, ..."""
    run_dir = Path(run_dir)
    first = [run_dir / CONFIG] if (run_dir / CONFIG).is_file() else []
    resumes = []
    for n in range(1, 10_000):
        path = run_dir / RESUME_CONFIG.format(n)
        if not path.is_file():
            break
        resumes.append(path)
    return first + resumes


def latest_config(run_dir: str | Path) -> Path:
    """The config the run's checkpoints were last trained with (config.yaml if never changed)."""
    history = config_history(run_dir)
    return history[-1] if history else Path(run_dir) / CONFIG


def save_config(cfg: Any, run_dir: str | Path, resuming: bool = False) -> Path:
    """Record the fully resolved config, the file eval.py and resumes rebuild a run from.

    A fresh run writes config.yaml. A resume never overwrites it: a config that differs from the
    latest one in the history is kept as config.resume-<N>.yaml (what changed, and when, stays
    readable), an identical one adds nothing.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    text = OmegaConf.to_yaml(cfg, resolve=True)
    history = config_history(run_dir)
    if not resuming or not history:
        return atomic_write(run_dir / CONFIG, text)
    if history[-1].read_text() == text:
        return history[-1]
    return atomic_write(run_dir / RESUME_CONFIG.format(len(history)), text)


def save_hydra_record(run_dir: str | Path, config: Any, hydra: Any, overrides: Any) -> Path:
    """`<run>/.hydra/config.yaml`, `hydra.yaml`, `overrides.yaml`: the files Hydra writes there
    (hydra.core.utils.run_job), written by the run itself once it is accepted
    (training.guard.accept_run), so that a refused run does not rewrite them."""
    from omegaconf import OmegaConf

    folder = Path(run_dir) / HYDRA_RECORD
    for name, node in (("config", config), ("hydra", hydra), ("overrides", overrides)):
        atomic_write(folder / f"{name}.yaml", OmegaConf.to_yaml(node))
    return folder
