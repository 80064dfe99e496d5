"""Putting a checkpoint's weights into a model: exactly (inference, testing) or all but the
classifier (fine-tuning), refusing with the differing tensors named when the architectures do not
match.

Fine-tuning also starts from plain weights: a .safetensors file or an export folder
(export.py --format safetensors).

`load_state_dict`'s own error is a wall of key names; these messages say which model was expected,
what differs (first few tensors with both shapes) and what to do about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gunn_exp.errors import CheckpointError
from gunn_exp.models.pretrained import WEIGHT_FILES, read_state_dict
from gunn_exp.rundir.checkpoint import RunDescription, load_checkpoint, model_state
from gunn_exp.rundir.configs import run_model_name
from gunn_exp.rundir.files import BEST, checkpoint_path

log = logging.getLogger(__name__)

SHOWN = 4  # differing tensors named in a message


@dataclass
class StateDiff:
    """How a checkpoint's tensors differ from a model's (keys without the `model.` prefix)."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @classmethod
    def between(cls, model: nn.Module, state: dict[str, Tensor]) -> StateDiff:
        own = model.state_dict()
        return cls(
            missing=[k for k in own if k not in state],
            unexpected=[k for k in state if k not in own],
            shapes=[
                (k, tuple(state[k].shape), tuple(v.shape))
                for k, v in own.items()
                if k in state and state[k].shape != v.shape
            ],
        )

    def without(self, keys: set[str]) -> StateDiff:
        """The differences outside `keys` (e.g. outside the classifier)."""
        return StateDiff(
            [k for k in self.missing if k not in keys],
            [k for k in self.unexpected if k not in keys],
            [s for s in self.shapes if s[0] not in keys],
        )

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)

    def __str__(self) -> str:
        parts = []
        if self.shapes:
            shown = ", ".join(
                f"{k} {list(a)} in the checkpoint vs {list(b)} in the model"
                for k, a, b in self.shapes[:SHOWN]
            )
            parts.append(
                f"{len(self.shapes)} tensor(s) of another shape ({shown}{_more(self.shapes)})"
            )
        if self.missing:
            parts.append(
                f"{len(self.missing)} tensor(s) missing from the checkpoint "
                f"({', '.join(self.missing[:SHOWN])}{_more(self.missing)})"
            )
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} tensor(s) the model does not have "
                f"({', '.join(self.unexpected[:SHOWN])}{_more(self.unexpected)})"
            )
        return "; ".join(parts)


def _more(items: list[Any]) -> str:
    return f", ... {len(items) - SHOWN} more" if len(items) > SHOWN else ""


def classifier_keys(model: nn.Module) -> set[str]:
    """State keys of the classifier (`fc`, the model API's last Linear): replaced on fine-tuning."""
    return {f"fc.{k}" for k in model.fc.state_dict()}


def trained_as(ckpt: dict[str, Any] | None, path: str | Path) -> str | None:
    """The model a checkpoint was trained as: its own description, else its run's config.yaml."""
    described = RunDescription.from_checkpoint(ckpt, path) if ckpt is not None else None
    return described.model if described else run_model_name(path)


def load_weights(model: nn.Module, ckpt: dict[str, Any], path: str | Path, model_name: str) -> None:
    """Load every network tensor of checkpoint `ckpt` (read from `path`) into `model`, or refuse
    naming what differs."""
    state = model_state(ckpt, path)
    diff = StateDiff.between(model, state)
    if diff:
        raise CheckpointError(
            f"checkpoint {path} does not match model {model_name}: {diff}. It was trained as "
            f"model {trained_as(ckpt, path) or '<unknown>'}; use a checkpoint of this run, or the "
            f"run the checkpoint belongs to."
        )
    model.load_state_dict(state)


def init_from_checkpoint(model: nn.Module, path: str | Path, model_name: str) -> list[str]:
    """Fine-tuning: copy checkpoint `path` into `model`, all but a classifier of another shape.

    The classifier is kept when it has the same shape (same number of classes) and left freshly
    initialised otherwise; every other tensor must match. Returns the re-initialised keys.
    `path` may be a checkpoint, a weight file, export.py's folder, or a run directory (its
    best.ckpt, as eval.py and classify.py read a run).
    """
    best = checkpoint_path(path, BEST)
    weight_files = [Path(path) / f for f in WEIGHT_FILES]
    if Path(path).is_dir() and not any(f.is_file() for f in weight_files) and best.is_file():
        path = best
    plain = Path(path).suffix == ".safetensors" or Path(path).is_dir()  # export.py's output
    ckpt = None if plain else load_checkpoint(path)
    state = read_state_dict(path) if ckpt is None else model_state(ckpt, path)
    head = classifier_keys(model)
    diff = StateDiff.between(model, state)
    backbone = diff.without(head)
    if backbone:
        raise CheckpointError(
            f"init_from={path}: its backbone does not match model {model_name}: {backbone}. "
            f"Fine-tuning needs the architecture the checkpoint was trained with (only the "
            f"number of classes may change): set model={trained_as(ckpt, path) or '<that model>'}."
        )
    fresh = sorted({k for k, _, _ in diff.shapes} | set(diff.missing))
    copied = {k: v for k, v in state.items() if k not in fresh and k not in diff.unexpected}
    model.load_state_dict(copied, strict=False)
    log.info(
        f"init_from {path}: {len(copied)} tensors copied; "
        + (
            f"re-initialised (classifier of another shape): {', '.join(fresh)}"
            if fresh
            else "classifier kept (same number of classes)"
        )
    )
    return fresh
