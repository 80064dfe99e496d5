"""Reading checkpoints safely: a clear error for a missing, corrupt or foreign file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


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
