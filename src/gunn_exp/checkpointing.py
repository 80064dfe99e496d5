"""Reading checkpoints safely (a clear error for a missing, corrupt or foreign file) and writing
them atomically (a crash or kill during a save never leaves a truncated checkpoint behind)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.plugins import TorchCheckpointIO


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a Lightning checkpoint (a dict with a `state_dict`) or refuse it with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # pickle/zip errors of every kind mean the same thing here
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({type(err).__name__}: {err}); "
            f"use another checkpoint of the run (e.g. checkpoints/best.ckpt or last.ckpt)."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"checkpoint {path} has no 'state_dict': it was not written by gunn-exp/Lightning."
        )
    return ckpt


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` that either fully replaces `path` or leaves it untouched.

    The bytes go to a temporary file in the same directory (so the final rename never crosses a
    filesystem), are fsynced, then renamed over `path`; the directory is fsynced so the rename
    survives a machine crash too. A kill at any point leaves the old file (and at worst a
    `.tmp` file, removed on the next successful save of the same path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with `atomic_torch_save` for local paths.

    Every checkpoint Lightning writes (ModelCheckpoint's best/last, the signal handler's save,
    `trainer.save_checkpoint`) goes through the strategy's CheckpointIO, so this one plugin makes
    all of them atomic. Lightning's own writer stages the file in the system temp directory and
    moves it, which is a non-atomic copy when that directory is on another filesystem (typical on
    clusters), and does not fsync. Remote (fsspec) paths keep Lightning's behaviour.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)
