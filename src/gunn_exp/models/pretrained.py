"""Pretrained configs (timm's `pretrained_cfg`) and loading plain weights into a model.

A pretrained cfg says what a model expects and where its weights are, in timm's field names:
`input_size`, `pool_size` (the final feature map at `input_size`), `mean`/`std`, `interpolation`,
`crop_pct`, `first_conv`, `classifier`, `num_classes`, and a weight source (`file`, `state_dict`,
or `source="local-dir"` with `file` a folder). `timm.data.resolve_data_config` reads it, so a CIFAR
model gets 32x32 CIFAR preprocessing and an ImageNet model 224x224 ImageNet preprocessing.

No weights are published for these models: pretrained=True needs a source given by the caller
(`pretrained_cfg_overlay=dict(file=...)`), typically what `export.py --format safetensors` wrote.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

# The one definition of the datasets' normalisation: a model's pretrained cfg carries it, and
# the data modules (gunn_exp.data.transforms) normalise with it.
CIFAR_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Per-channel, on the 0-255 scale, as in the authors' datasets/cifar*-gen.lua.
    "cifar10": ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
    "cifar100": ((129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Weight files looked for in a folder, in this order (the Hugging Face layout's names).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def cifar_cfg(dataset: str = "cifar10", pool_size: tuple[int, int] | None = (8, 8)) -> dict:
    """CIFAR-10/100 at 32x32: no resize or crop, the dataset's mean/std."""
    mean, std = (tuple(v / 255 for v in stat) for stat in CIFAR_STATS[dataset])
    return {
        "num_classes": 10 if dataset == "cifar10" else 100,
        "input_size": (3, 32, 32),
        "pool_size": pool_size,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": mean,
        "std": std,
        "first_conv": "stem.0",
        "classifier": "fc",
    }


def imagenet_cfg(pool_size: tuple[int, int] | None = (7, 7)) -> dict:
    """ImageNet-1k at 224x224: resize the shorter side to 256 (crop 0.875) with bicubic
    interpolation, as the authors' transforms.lua, centre crop, ImageNet mean/std."""
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": pool_size,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "first_conv": "stem.0",
        "classifier": "fc",
    }


def cifar_cfgs(pool_size: tuple[int, int] | None = (8, 8)) -> dict[str, dict]:
    """A CIFAR model's pretrained cfgs by tag: "cifar10" (the default) and "cifar100"."""
    return {d: cifar_cfg(d, pool_size) for d in ("cifar10", "cifar100")}


def imagenet_cfgs(pool_size: tuple[int, int] | None = (7, 7)) -> dict[str, dict]:
    """An ImageNet model's pretrained cfgs by tag: "in1k"."""
    return {"in1k": imagenet_cfg(pool_size)}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Plain weights from a .safetensors file, a torch file of tensors, or a folder holding one
    of `WEIGHT_FILES` (what export.py and save_pretrained write)."""
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if found is None:
            raise FileNotFoundError(
                f"{path}: no weight file ({', '.join(WEIGHT_FILES)}) in it; give a weight file, "
                f"a .ckpt, export.py's folder or a run directory with checkpoints/best.ckpt."
            )
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path} do not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix == ".ckpt":
        raise ValueError(
            f"{path} is a training checkpoint; export its plain weights first: "
            f"python export.py <run> --format safetensors."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """timm's `checkpoint_path`: the weights in `path`, every tensor of the model, nothing else."""
    state = read_state_dict(path)
    check_fit(model.state_dict(), state, f"{name}: checkpoint_path={path}", set())
    model.load_state_dict(state)


def check_fit(own: dict[str, Tensor], state: dict[str, Tensor], what: str, fresh: set[str]) -> None:
    """Refuse weights `state` that do not fit the model's `own` (keys in `fresh` stay the
    model's), naming what is missing, unexpected or of another shape."""
    missing = [k for k in own if k not in state and k not in fresh]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{what}: the weights do not fit the model: {len(shapes)} of another shape "
            f"{shapes[:3]}, {len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected "
            f"{unexpected[:3]}; they were saved from another architecture (or class count)."
        )


def load_pretrained(model: nn.Module, cfg: dict, name: str) -> None:
    """Load the weights `cfg` points to into `model`. As with `init_from`, a classifier of
    another shape (class count) stays freshly initialised; every other tensor must match."""
    if cfg.get("state_dict") is not None:
        state = dict(cfg["state_dict"])
    elif cfg.get("file"):
        state = read_state_dict(cfg["file"])
    else:
        raise ValueError(
            f"{name}: pretrained=True but no weights are published for it; pass "
            f"pretrained_cfg_overlay=dict(file='<model.safetensors or export folder>')."
        )
    own = model.state_dict()
    head = f"{cfg.get('classifier') or 'fc'}."
    fresh = {
        k for k in own if k.startswith(head) and (k not in state or state[k].shape != own[k].shape)
    }
    state = {
        k: v
        for k, v in state.items()
        if k not in fresh and not (k.startswith(head) and k not in own)
    }
    first = f"{cfg.get('first_conv')}.weight"
    if first in state and first in own and state[first].shape[1] != own[first].shape[1]:
        raise ValueError(
            f"{name}: the weights' first conv {first} has {state[first].shape[1]} input channels, "
            f"the model {own[first].shape[1]}; build with in_chans={state[first].shape[1]} "
            f"(timm.create_model adapts it for you)."
        )
    check_fit(own, state, f"{name}: pretrained", fresh)
    model.load_state_dict(state, strict=False)
