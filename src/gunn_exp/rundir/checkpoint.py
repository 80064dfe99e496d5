"""Reading a checkpoint safely, and what a checkpoint says about the run that wrote it.

Every checkpoint the project loads goes through `load_checkpoint`: torch's `weights_only`
unpickler, which rebuilds tensors and plain containers and nothing else. A file that asks for
more (a class or a function to call: what a malicious pickle runs) is refused with the name of
what it asked for, and none of it executes. Lightning's own loads (a resume) come here too, through
the run's checkpoint plugin (training.checkpoints.AtomicCheckpointIO).

A checkpoint also describes itself, as nanoGPT's carry `model_args` and torchvision's weights carry
`meta`: under `DESCRIPTION_KEY` it holds the model's registry name and arguments, the class names,
the preprocessing and the run's resolved config, in plain Python values. A `.ckpt` copied out of
its run directory therefore still builds its model, names its outputs and preprocesses images.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gunn_exp.errors import CheckpointError, first_line

DESCRIPTION_KEY = "gunn_exp"
FIT_METRICS_KEY = "gunn_exp_fit_metrics"  # {name: value} logged last in fit (training.checkpoints)
DESCRIPTION_FORMAT = 1
PREFIX = "model."  # ClassificationModule keeps the network under `self.model`
# What Lightning needs to continue training (a weights-only file has just `state_dict`).
TRAINING_STATE = ("epoch", "global_step", "loops", "optimizer_states", "callbacks")


@dataclass(frozen=True)
class RunDescription:
    """What a checkpoint says about its run: enough to use it with no run directory around it.

    `model`/`model_args`: `gunn_exp.models.create_model(model, **model_args)` rebuilds the
    network (a registry name, never an import path: loading a file must not choose code to run).
    `preprocessing`: a `rundir.preprocessing.Preprocessing` as a dict. `config`: the resolved
    config of the run (for a resume's comparison and for people).
    """

    model: str
    model_args: dict[str, Any]
    classes: list[str]
    preprocessing: dict[str, Any]
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": DESCRIPTION_FORMAT, **asdict(self)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], path: str | Path) -> RunDescription | None:
        """The description in `ckpt`, None for checkpoints written before there was one."""
        raw = ckpt.get(DESCRIPTION_KEY)
        if raw is None:
            return None
        raw = raw if isinstance(raw, dict) else {}
        kinds = {"model": str, "model_args": dict, "classes": list, "preprocessing": dict}
        bad = [key for key, kind in kinds.items() if not isinstance(raw.get(key), kind)]
        if raw.get("format") != DESCRIPTION_FORMAT or bad:
            raise CheckpointError(
                f"checkpoint {path}: its '{DESCRIPTION_KEY}' description is not one this version "
                f"reads (format {raw.get('format')}, bad or missing: {', '.join(bad) or 'none'}); "
                f"use a checkpoint written by this version of train.py."
            )
        return cls(
            model=raw["model"],
            model_args=raw["model_args"],
            classes=[str(c) for c in raw["classes"]],
            preprocessing=raw["preprocessing"],
            config=raw.get("config") or {},
        )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint (a dict with a `state_dict`), loaded without running any code.

    Refused in one line (CheckpointError) when it is missing, corrupt, asks the unpickler for
    anything beyond tensors and plain data, or is not a checkpoint of a LightningModule.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a .ckpt file; give a file (a run keeps its "
            f"best.ckpt and last.ckpt in <run>/checkpoints/)."
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    if path.stat().st_size == 0:  # torch says only "EOFError"
        raise corrupt(path, "the file is empty")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        if wanted:  # a pickle that names a callable: what an attack (or a foreign object) needs
            raise CheckpointError(
                f"checkpoint {path} was not loaded: it asks to run `{wanted.group(1)}` when "
                f"unpickled, and only tensors and plain data are loaded (a checkpoint of "
                f"train.py needs nothing more). Do not use it unless you know who made it and why."
            ) from err
        raise corrupt(path, unpickler_reason(err)) from err  # e.g. random bytes: "operand 240"
    except Exception as err:  # zip/pickle errors of every kind mean the same thing here
        reason = first_line(err).split(". ")[0]  # torch's advice follows its first sentence
        raise corrupt(path, f"{type(err).__name__}: {reason}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        plain = isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())
        hint = (
            " It holds plain weights (a state_dict): load them into a model you build, e.g. "
            "create_model(<name>, pretrained=True, pretrained_cfg_overlay=dict(file=...)) "
            "(docs/USING_MODELS.md)."
            if plain
            else ""
        )
        raise CheckpointError(
            f"checkpoint {path} has no 'state_dict': it was not written by gunn-exp/Lightning."
            + hint
        )
    return ckpt


def corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a PyTorch file ({why}); use another checkpoint of "
        f"the run (e.g. checkpoints/best.ckpt or last.ckpt)."
    )


def unpickler_reason(err: pickle.UnpicklingError) -> str:
    """torch's safe unpickler's own reason (its message wraps it in paragraphs of advice)."""
    reason = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
    return f"the safe unpickler stopped at: {reason[1].strip() if reason else first_line(err)}"


def model_state(ckpt: dict[str, Any], path: str | Path) -> dict[str, Tensor]:
    """The network's tensors of a ClassificationModule checkpoint, keys without `model.`."""
    state = {k[len(PREFIX) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(PREFIX)}
    if not state:
        raise CheckpointError(
            f"checkpoint {path} holds no network weights (no '{PREFIX}*' tensors): it was not "
            f"written by gunn-exp's train.py."
        )
    return state


def checkpoint_position(path: Path) -> str:
    """Where in training checkpoint `path` was saved: `saved in epoch 3, step 120` (epochs from
    1). For messages on failure paths: says what is known and never raises."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return f"saved in epoch {ckpt['epoch'] + 1}, step {ckpt['global_step']}"
    except Exception as err:
        return f"unreadable: {err.__class__.__name__}"
