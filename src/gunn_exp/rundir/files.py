"""The names of the files a run writes, and how they are written and read back.

Every file goes through `atomic_write`: it is either fully replaced or untouched, whatever kills
the process. Nothing here imports torch, Lightning or the training code.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gunn_exp.errors import ConfigError, DiskFull, RunError

CONFIG = "config.yaml"
RESUME_CONFIG = "config.resume-{}.yaml"
HYDRA_RECORD = ".hydra"
LOCK = "run.lock"
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


def checkpoint_path(run_dir: str | Path, name: str) -> Path:
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
    except Exception as err:
        if out_of_space(err):
            tmp.unlink(missing_ok=True)  # give the space back before anything else runs
            raise DiskFull(str(path), shutil.disk_usage(path.parent).free) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def out_of_space(err: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error `err` is or was raised from, if any (torch.save, for one,
    reports a failed write as a RuntimeError raised while handling the OSError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def writable_folder(folder: str | Path, option: str) -> Path:
    """`folder`, created if needed, once a file could be written in it: a tool's output folder,
    checked before any work. Refused in one line naming `option`, the folder and the reason
    (read-only, a file in the way, ...) rather than with the first write's traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):  # root ignores permission bits: really write
            pass
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
        raise ConfigError(
            f"{option} {folder}: cannot write there: {err.strerror or err}{where}; give a folder "
            f"you can write to."
        ) from err
    return folder


def write_json(path: str | Path, obj: Any, sort_keys: bool = True) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def write_classes(classes: list[str], folder: str | Path) -> Path:
    """`<folder>/classes.json`: the class names, in output order."""
    return write_json(Path(folder) / CLASSES, list(classes), sort_keys=False)


def read_classes(folder: str | Path) -> list[str] | None:
    """The class names of `<folder>/classes.json`, or None where there is none."""
    path = Path(folder) / CLASSES
    return json.loads(path.read_text()) if path.is_file() else None


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    return write_json(Path(output_dir) / RESULTS, results)


def read_results(path: str | Path) -> dict[str, Any]:
    """A run's results.json, refused in one line naming the file when it is not one (a copy cut
    short, an edit gone wrong)."""
    try:
        results = json.loads(Path(path).read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise RunError(
            f"{path} is not valid JSON ({err}); restore it from a copy of the run, or leave that "
            f"run out (its run directory is the one holding the file)."
        ) from err
    if not isinstance(results, dict):
        kind = type(results).__name__
        raise RunError(f"{path} holds a {kind}, not the results of a train.py run.")
    return results


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The per-epoch rows of a `metrics.csv`, as floats; [] if absent."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]
