"""The run directory: the name of every file a run writes, how to find a run from a path, and
the one atomic writer every file goes through.

    <run>/config.yaml           the resolved config (what rebuilds the model and resumes)
    <run>/checkpoints/best.ckpt lowest val top-1 error; last.ckpt: every epoch and on a signal
    <run>/metrics.csv           one row per epoch (continues across resumes)
    <run>/curves.png            loss and error curves
    <run>/results.json          the numbers a finished run is judged by
    <run>/classes.json          class names, in output order
    <run>/preprocessing.json    how an image file becomes an input (inference/preprocessing.py)
    <run>/wandb_id.txt          the wandb run a resume continues
    <run>/eval/<tag>/           eval.py outputs; <run>/export/: export.py outputs
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"  # checkpoint stems: `ckpt=best|last` on the command line
LAST = "last"
CKPT_SUFFIX = ".ckpt"
METRICS = "metrics.csv"
CURVES = "curves.png"
RESULTS = "results.json"
CLASSES = "classes.json"
PREPROCESSING = "preprocessing.json"
WANDB_ID = "wandb_id.txt"
EVAL = "eval"
EXPORT = "export"


def checkpoint(run_dir: str | Path, name: str) -> Path:
    """`<run_dir>/checkpoints/<name>.ckpt` (name: best or last)."""
    return Path(run_dir) / CHECKPOINTS / ckpt_name(name)


def ckpt_name(name: str) -> str:
    """The file name of checkpoint `name` (best or last) inside <run>/checkpoints/."""
    return f"{name}{CKPT_SUFFIX}"


def find_run_dir(path: str | Path) -> Path | None:
    """The run directory `path` belongs to: the nearest of `path`, its parent and grandparent
    that holds config.yaml (a run, a file in it, or a checkpoint in <run>/checkpoints/), or None.
    """
    path = Path(path)
    candidates = [path, *path.parents[:2]] if path.is_dir() else list(path.parents[:2])
    return next((d for d in candidates if (d / CONFIG).is_file()), None)


def run_model_name(path: str | Path) -> str | None:
    """The model name in the config.yaml of the run that `path` belongs to, if there is one."""
    from omegaconf import OmegaConf

    run_dir = find_run_dir(path)
    if run_dir is None:
        return None
    return OmegaConf.select(read_config(run_dir), "model.name")


def read_config(run_dir: str | Path) -> DictConfig:
    """`<run_dir>/config.yaml`, refused in one line when it is not a readable run config (a YAML
    error from an edit, a truncated copy) rather than with the parser's traceback."""
    from omegaconf import DictConfig, OmegaConf

    from gunn_exp.errors import RunError

    path = Path(run_dir) / CONFIG
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


def atomic_write(path: str | Path, content: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Write `path` so that it is either fully replaced or untouched, whatever kills the process.

    `content` is text, bytes, or a function that writes into the open binary file. The bytes go
    to a temporary file in the same directory (the rename never crosses a filesystem), are
    fsynced, renamed over `path`, and the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    return write_json(Path(output_dir) / RESULTS, results)


def read_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The per-epoch rows of a `metrics.csv`, as floats; [] if absent."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the fully resolved config, the file eval.py and resumes rebuild a run from."""
    from omegaconf import OmegaConf

    return atomic_write(Path(run_dir) / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
