"""The run directory: the name of every file a run writes, how to find a run from a path, and
the one atomic writer every file goes through.

    <run>/config.yaml           the resolved config the run started with (never overwritten)
    <run>/config.resume-<N>.yaml the config of the N-th resume, when it differs (history)
    <run>/run.lock              pid and host of the process writing the run (one at a time)
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
import errno
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from gunn_exp.errors import DiskFull, RunError

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONFIG = "config.yaml"
RESUME_CONFIG = "config.resume-{}.yaml"
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


class RunLock:
    """`<run>/run.lock` while a process trains into the run directory: a second run refuses.

    The file holds `<pid> <host> [<SLURM job id>]`. A lock whose process is gone (killed, crashed;
    same host) is stale and taken over, and so is one of this SLURM job before it was requeued.
    A lock held by this process's parent is the same run: Lightning's DDP ranks and multirun
    jobs re-run train.py as child processes of the process holding it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.job = os.environ.get("SLURM_JOB_ID", "")
        self.mine = f"{os.getpid()} {socket.gethostname()} {self.job}".rstrip()
        self.held = False

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = self._holder()
            if holder is None:
                continue  # released between our attempt and the read
            pid, host, job = holder
            if host == socket.gethostname() and pid == os.getppid():
                return self  # our parent's run: not ours to take or release
            here = host == socket.gethostname()
            if (here and not _alive(pid)) or (self.job and job == self.job and pid != os.getpid()):
                # Stale: its process is gone, or it is this SLURM job before a requeue (which
                # may land on another node after a hard kill).
                self.path.unlink(missing_ok=True)
                continue
            raise RunError(
                f"run directory {self.path.parent} is in use by process {pid} on {host} "
                f"({self.path}); wait for that run to end, or train into another directory "
                f"(hydra.run.dir=...). Delete {self.path} only if no process is using it."
            )
        self.held = True
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        holder = self._holder()
        if self.held and holder and holder[:2] == (os.getpid(), socket.gethostname()):
            self.path.unlink(missing_ok=True)
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.mine + "\n")
        return True

    def _holder(self) -> tuple[int, str, str] | None:
        """(pid, host, SLURM job id or "") of the lock's holder; None if there is no lock."""
        try:
            pid, host, *job = self.path.read_text().split()
            return int(pid), host, "".join(job)
        except FileNotFoundError:
            return None
        except ValueError:  # empty or garbled (a writer killed mid-write): nobody holds it
            return 0, socket.gethostname(), ""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True
