"""A finished run as an eval-mode model: shared by eval.py, classify.py, features.py, export.py.

A run directory (rundir.py) holds everything needed: `config.yaml` says which model to build,
`checkpoints/{best,last}.ckpt` hold its weights, `classes.json` and `preprocessing.json` say what
its outputs mean and how an image file becomes an input. Runs that stopped before writing the last
two (interrupted, or older) get them by rebuilding their data module from `config.yaml`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import UnidentifiedImageError
from torch import Tensor, nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from gunn_exp import rundir
from gunn_exp.data import ImageDataModule
from gunn_exp.errors import RunError
from gunn_exp.inference.preprocessing import Preprocessing
from gunn_exp.inference.weights import load_weights

log = logging.getLogger(__name__)

CKPT_NAMES = (rundir.BEST, rundir.LAST)


@dataclass
class Run:
    """One run's model in eval mode on `device`, with what is needed to use it."""

    run_dir: Path
    config: DictConfig
    checkpoint: Path
    epoch: int | None
    model: nn.Module

    @property
    def model_name(self) -> str:
        return str(self.config.model.name)

    @cached_property
    def classes(self) -> list[str]:
        path = self.run_dir / rundir.CLASSES
        return json.loads(path.read_text()) if path.is_file() else list(self._datamodule.classes)

    @cached_property
    def preprocessing(self) -> Preprocessing:
        if (self.run_dir / rundir.PREPROCESSING).is_file():
            return Preprocessing.read(self.run_dir)
        return Preprocessing.from_datamodule(self._datamodule)

    @cached_property
    def _datamodule(self) -> ImageDataModule:
        log.info(
            f"{self.run_dir} has no {rundir.CLASSES}/{rundir.PREPROCESSING}: rebuilding its data"
        )
        dm: ImageDataModule = instantiate(self.config.data)
        dm.prepare_data()
        dm.setup("test")
        return dm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_run(path: str | Path, ckpt: str = "best") -> tuple[Path, Path]:
    """(run directory, checkpoint) from a run directory plus `ckpt` (best, last or a path), or
    from a checkpoint file inside a run directory (then `ckpt` is ignored)."""
    path = Path(path)
    if path.is_file():
        run_dir = rundir.find_run_dir(path)
        if run_dir is None:
            raise RunError(
                f"{path}: no config.yaml beside it or in its parent, so the model it holds is "
                f"unknown; pass the run directory (or a checkpoint inside <run>/checkpoints/)."
            )
        return run_dir, path
    if not (path / rundir.CONFIG).is_file():
        raise RunError(
            f"{path} is not a run directory (no config.yaml); pass the folder train.py wrote "
            f"(logs/<task>/runs/<time>_<model>_<data>) or a checkpoint in it."
        )
    if ckpt not in CKPT_NAMES:
        return path, Path(ckpt)
    checkpoint = rundir.checkpoint(path, ckpt)
    if not checkpoint.is_file():
        other = CKPT_NAMES[1 - CKPT_NAMES.index(ckpt)]
        raise RunError(f"{path} has no checkpoints/{ckpt}.ckpt; use ckpt={other} or ckpt=<path>.")
    return path, checkpoint


def load_run(path: str | Path, ckpt: str = "best", device: str | torch.device = "cpu") -> Run:
    """Build the run's model from its config.yaml, load the checkpoint, put it in eval mode."""
    run_dir, checkpoint = find_run(path, ckpt)
    config = OmegaConf.load(rundir.latest_config(run_dir))  # the config it last trained with
    model: nn.Module = instantiate(config.model)
    loaded = load_weights(model, checkpoint, str(config.model.name))
    model.eval().to(resolve_device(device))
    # Lightning stores the 0-based index of the epoch it saved in; report epochs completed
    # (1-based, like metrics.csv and results.json).
    epoch = loaded["epoch"] + 1 if isinstance(loaded.get("epoch"), int) else None
    return Run(run_dir, config, checkpoint, epoch, model)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def predict_log_probs(model: nn.Module, x: Tensor) -> Tensor:
    """Log-softmax scores; a 5-D (N, crops, C, H, W) batch gets the log of the softmax averaged
    over the crops, as ClassificationModule evaluates ten crops.

    Logs, not probabilities: a confident model's small probabilities underflow to equal zeros,
    which would make the top-5 ranking arbitrary; log-softmax keeps the logits' order.
    """
    if x.ndim == 5:
        n, crops = x.shape[:2]
        scores = model(x.flatten(0, 1)).log_softmax(-1).view(n, crops, -1)
        return scores.logsumexp(1) - math.log(crops)
    return model(x).log_softmax(-1)


@torch.no_grad()
def pooled_features(model: nn.Module, x: Tensor) -> Tensor:
    """The globally pooled penultimate features (the classifier's input), `num_features` each."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def list_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, name) of every image to process: files as given, folders searched recursively for
    image extensions (named relative to the folder). Named files are tried whatever their suffix."""
    found: list[tuple[Path, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            found += [(p, str(p.relative_to(item))) for p in files]
        elif item.exists():
            found.append((item, str(item)))
        else:
            raise RunError(f"{item}: no such file or folder.")
    return found


@dataclass
class Skipped:
    name: str
    reason: str


def image_batches(
    images: Sequence[tuple[Path, str]],
    preprocessing: Preprocessing,
    batch_size: int,
    skipped: list[Skipped],
) -> Iterator[tuple[list[str], Tensor]]:
    """Batches of (names, preprocessed images); unreadable files are logged, appended to
    `skipped` and left out, so one bad file does not stop a folder."""
    names: list[str] = []
    tensors: list[Tensor] = []
    for path, name in images:
        try:
            tensors.append(preprocessing.load(path))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            skipped.append(Skipped(name, f"{type(err).__name__}: {err}"))
            log.warning(f"skipped {name}: cannot read it as an image ({err})")
            continue
        names.append(name)
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)
