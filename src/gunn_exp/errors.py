"""The errors a user can act on, and the one rule that turns them into an exit status.

Every entry point (train.py, eval.py, classify.py, ...) ends through `exit_code`: bad input of any
kind (a config value, a checkpoint, a run directory, missing data) exits 2 with one line
`error: <message>`; a run stopped on purpose (a signal, a non-finite loss) exits with its own code
and `stopped: <message>`. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hydra.errors import CompactHydraException


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


# How DataLoader workers re-raise an exception in the main process (torch's ExceptionWrapper):
# "Caught <Type> in DataLoader worker process N.\nOriginal Traceback ...\n<module>.<Type>: <msg>".
_WORKER_PREFIX = "Caught "


class DataError(ConfigError):
    """Data that cannot be used (missing, corrupt, inconsistent); the message names the file or
    folder and the fix. A ConfigError, so entry points stop with exit code 2 and one line.

    Raised inside a DataLoader worker it comes back re-created from the worker's whole traceback
    text; the constructor keeps only the original one-line message so the report stays one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith(_WORKER_PREFIX) and "Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(" ".join(message.split()))  # one line, whatever the wrapped error said


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class RunError(ValueError):
    """A run directory or checkpoint that cannot be used; the message says what to pass instead."""


class RunStopped(RuntimeError):
    """Training stopped on purpose; the message says why and how to go on."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class NonFiniteLoss(RunStopped):
    """The training loss became nan/inf."""


class DiskFull(RunStopped):
    """A write failed for lack of space (ENOSPC/EDQUOT); the file it was replacing is intact."""

    def __init__(self, path: str, free_bytes: int | None = None, detail: str = "") -> None:
        free = f", {free_bytes / 2**20:.0f} MiB free" if free_bytes is not None else ""
        message = f"disk full while writing {path} (no space left on its device{free})"
        super().__init__(f"{message}; {detail}" if detail else message)
        self.path, self.free_bytes = path, free_bytes


class Interrupted(RunStopped):
    """A signal (SIGTERM from SLURM or `kill`, SIGINT from Ctrl-C) stopped training."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message, exit_code=128 + signum)  # the shell's "killed by signal N"


class JobFailed(CompactHydraException):
    """A sweep job that did not finish. Its message is one line (the job's `error:`/`stopped:`
    line, its exception, or how its process died); Hydra prints it without a traceback."""


# FileNotFoundError: a data set or image folder that is not where the config says.
BAD_INPUT = (ConfigError, CheckpointError, RunError, FileNotFoundError)
BAD_INPUT_EXIT = 2


def exit_code(err: BaseException) -> int | None:
    """The exit status for `err` (None: not a user-facing error, let it raise)."""
    if isinstance(err, RunStopped):
        return err.exit_code
    if isinstance(err, BAD_INPUT):
        return BAD_INPUT_EXIT
    return None


def one_line(err: BaseException) -> str:
    """The line printed for an error `exit_code` knows."""
    return f"{'stopped' if isinstance(err, RunStopped) else 'error'}: {err}"


def first_line(err: BaseException) -> str:
    """A library's exception in one line (its first), for a message of ours that quotes it."""
    text = str(err).strip()
    return text.splitlines()[0] if text else repr(err)


# What a constructor raises when it refuses the arguments a config gave it (a bad value or type,
# a package the option needs); Lightning's own refusals are MisconfigurationException.
_REFUSALS = (ValueError, TypeError, ImportError)


def refusal(err: BaseException | None, key: str) -> ConfigError | None:
    """The one line for a constructor's refusal of config group `key`'s arguments (model, data,
    trainer, optimizer, ...), naming the group and quoting the constructor; None when `err` is
    no refusal (a bug: it keeps its traceback)."""
    if isinstance(err, ConfigError):  # already one line naming the key and the fix
        return err
    if not isinstance(err, _REFUSALS) and type(err).__name__ != "MisconfigurationException":
        return None
    text = first_line(err).rstrip(".")
    where = "" if text.startswith(f"{key}.") else f"{key}: "
    refused = ConfigError(f"{where}{text}. Fix the {key}.* values.")
    refused.__cause__ = err
    return refused


@contextmanager
def refusing(key: str) -> Iterator[None]:
    """Inside, a constructor's refusal of config group `key`'s arguments is one `refusal` line
    instead of a traceback."""
    try:
        yield
    except Exception as err:
        refused = refusal(err, key)
        if refused is None or refused is err:
            raise
        raise refused from err


def instantiate_config(node: Any, key: str, **kwargs: Any) -> Any:
    """Hydra's `instantiate(node, **kwargs)` for config group `key`; a refusal of its arguments
    is one `refusal` line instead of Hydra's multi-line wrapper."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        refused = refusal(err.__cause__, key)
        if refused is None:
            raise
    # Raised out here: the wrapper's cause may be `refused` itself, and raising it inside the
    # except would make each the other's context, a cycle that whoever walks the chain loops on.
    raise refused
