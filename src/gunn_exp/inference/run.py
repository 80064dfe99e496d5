"""A trained run as an eval-mode model: shared by eval.py, classify.py, features.py, export.py.

A checkpoint describes itself (rundir.checkpoint): which model to build and with which arguments,
the class names and the preprocessing travel inside it, so a `.ckpt` copied anywhere is enough.
Checkpoints written before that get the same from their run directory (`config.yaml`,
`classes.json`, `preprocessing.json`), rebuilding the data module from `config.yaml` where even
those files are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from PIL.Image import DecompressionBombError, UnidentifiedImageError
from torch import Tensor, nn
from torchvision.datasets.folder import IMG_EXTENSIONS

from gunn_exp import rundir
from gunn_exp.data import ImageDataModule
from gunn_exp.data.crops import reduce_crops
from gunn_exp.errors import RunError
from gunn_exp.rundir.build import build_datamodule, build_model, model_spec
from gunn_exp.rundir.checkpoint import RunDescription, load_checkpoint
from gunn_exp.rundir.configs import latest_config, read_config
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.rundir.weights import load_weights

log = logging.getLogger(__name__)

CKPT_NAMES = (rundir.BEST, rundir.LAST)


@dataclass
class Run:
    """One trained model in eval mode on its device, with what is needed to use it."""

    checkpoint: Path
    run_dir: Path | None  # the run directory around the checkpoint, if it is still in one
    config: DictConfig  # the run's resolved config
    model_name: str
    model_args: dict[str, Any]  # create_model(model_name, **model_args) rebuilds the network
    epoch: int | None
    model: nn.Module
    description: RunDescription | None = None

    @property
    def output_dir(self) -> Path:
        """Where eval/ and export/ outputs go: the run directory, else beside the checkpoint."""
        return self.run_dir or self.checkpoint.parent

    @cached_property
    def classes(self) -> list[str]:
        if self.description is not None:
            return self.description.classes
        found = rundir.read_classes(self.run_dir) if self.run_dir else None
        return found if found is not None else list(self._datamodule.classes)

    @cached_property
    def preprocessing(self) -> Preprocessing:
        if self.description is not None:
            return Preprocessing.from_dict(self.description.preprocessing)
        if self.run_dir and (self.run_dir / rundir.PREPROCESSING).is_file():
            return Preprocessing.read(self.run_dir)
        return Preprocessing.from_datamodule(self._datamodule)

    @cached_property
    def _datamodule(self) -> ImageDataModule:
        log.info(f"{self.checkpoint}: no classes/preprocessing recorded; rebuilding its data")
        data = OmegaConf.to_container(self.config.data, resolve=True)
        dm: ImageDataModule = build_datamodule(data, str(self.checkpoint))  # type: ignore[arg-type]
        dm.prepare_data()
        dm.setup("test")
        return dm

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def find_checkpoint(path: str | Path, ckpt: str = "best") -> tuple[Path, Path | None]:
    """(checkpoint, its run directory or None) from a checkpoint file anywhere, or from a run
    directory plus `ckpt` (best, last or a path)."""
    path = Path(path)
    if path.is_file():
        return path, rundir.find_run_dir(path)
    if not path.is_dir():
        raise RunError(f"{path}: no such checkpoint file or run directory.")
    if not (path / rundir.CONFIG).is_file():
        raise RunError(
            f"{path} is not a run directory (no config.yaml); pass the folder train.py wrote "
            f"(logs/<task>/runs/<time>_<model>_<data>) or a checkpoint file."
        )
    if ckpt not in CKPT_NAMES:
        for checkpoint in (Path(ckpt), path / ckpt):  # as given, or inside the run directory
            if checkpoint.is_file():
                return checkpoint, path
        raise RunError(
            f"ckpt={ckpt}: neither best, last nor a checkpoint file (looked in the current "
            f"folder and in {path}); use best, last or the path to a .ckpt (eval.py: "
            f"ckpt=<that>; classify.py, features.py, export.py: --ckpt <that>)."
        )
    checkpoint = rundir.checkpoint_path(path, ckpt)
    if not checkpoint.is_file():
        other = CKPT_NAMES[1 - CKPT_NAMES.index(ckpt)]
        raise RunError(
            f"{path} has no checkpoints/{ckpt}.ckpt; use {other} or the path to a .ckpt "
            f"(eval.py: ckpt=<that>; classify.py, features.py, export.py: --ckpt <that>)."
        )
    return checkpoint, path


def load_run(path: str | Path, ckpt: str = "best", device: str | torch.device = "cpu") -> Run:
    """Build the checkpoint's model as it describes it, load its weights, put it in eval mode."""
    checkpoint, run_dir = find_checkpoint(path, ckpt)
    loaded = load_checkpoint(checkpoint)
    described = RunDescription.from_checkpoint(loaded, checkpoint)
    if described is not None:
        config = OmegaConf.create(described.config)
        name, args = described.model, described.model_args
    elif run_dir is not None:  # written before checkpoints described themselves
        config = read_config(run_dir)
        model_cfg = OmegaConf.to_container(config.model, resolve=True)
        name, args = model_spec(model_cfg, str(latest_config(run_dir)))  # type: ignore[arg-type]
    else:
        raise RunError(
            f"{checkpoint} does not say which model it holds (written before checkpoints carried "
            f"their run's description) and has no run directory around it (config.yaml); put it "
            f"back in <run>/checkpoints/ or pass the run directory."
        )
    model = build_model(name, args)
    load_weights(model, loaded, checkpoint, name)
    model.eval().to(resolve_device(device))
    # Lightning stores the 0-based index of the epoch it saved in; report epochs completed
    # (1-based, like metrics.csv and results.json).
    epoch = loaded["epoch"] + 1 if isinstance(loaded.get("epoch"), int) else None
    return Run(checkpoint, run_dir, config, name, args, epoch, model, described)


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU. A CUDA device on a machine without one is
    refused here, before the model is moved (torch's own error comes later and less clearly)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise RunError(
            f"device {device!r} is not a device torch knows ({err}); use cpu, cuda or auto."
        ) from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {device!r}: this machine has no CUDA GPU; use cpu or auto.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise RunError(f"device {device!r}: this machine has no Apple GPU; use cpu or auto.")
    if resolved.type not in ("cpu", "cuda", "mps"):  # meta holds no data; xpu, ... untested
        raise RunError(f"device {device!r}: images are classified on cpu, cuda or mps (or auto).")
    return resolved


@torch.no_grad()
def predict_log_probs(model: nn.Module, x: Tensor) -> Tensor:
    """Log-softmax scores; a 5-D (N, crops, C, H, W) batch is scored by its crops' combined
    logits (the authors' rule, ClassificationModule's default for ten crops).

    Logs, not probabilities: a confident model's small probabilities underflow to equal zeros,
    which would make the top-5 ranking arbitrary; log-softmax keeps the logits' order.
    """
    if x.ndim == 5:
        return reduce_crops(model(x.flatten(0, 1)), x.shape[1]).log_softmax(-1)
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
            if not files:
                raise RunError(
                    f"{item}: the folder holds no image files (searched recursively for "
                    f"{', '.join(IMG_EXTENSIONS)}); pass a folder with images, or the files."
                )
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
        except (UnidentifiedImageError, DecompressionBombError, OSError, ValueError) as err:
            skipped.append(Skipped(name, f"{type(err).__name__}: {err}"))
            log.warning(f"skipped {name}: cannot read it as an image ({err})")
            continue
        names.append(name)
        if len(names) == batch_size:
            yield names, torch.stack(tensors)
            names, tensors = [], []
    if names:
        yield names, torch.stack(tensors)
