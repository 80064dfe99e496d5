"""`<run>/run.lock`: one process writes into a run directory at a time."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from types import TracebackType

from gunn_exp.errors import DiskFull, RunError
from gunn_exp.rundir.files import LOCK, out_of_space


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
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.mine + "\n")
        except OSError as err:  # e.g. a full disk: leave no empty lock behind, name the file
            self.path.unlink(missing_ok=True)
            if out_of_space(err):
                raise DiskFull(str(self.path), shutil.disk_usage(self.path.parent).free) from err
            raise
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
