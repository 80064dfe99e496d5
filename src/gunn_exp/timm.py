"""gunn-exp's models in timm: `import gunn_exp.timm`, then `timm.create_model("gunn15", ...)`.

Importing this module (it needs the `timm` extra) puts every model of gunn-exp's registry into
timm's registry under the same name, with all its pretrained cfgs (`gunn15.cifar10` the default,
`gunn15.cifar100`, `gunn18.in1k`, ...). The timm entrypoints build through timm's own
`build_model_with_cfg` around `gunn_exp.models.registry.build_architecture`, so everything timm
does at creation applies: pretrained weights from `pretrained_cfg_overlay=dict(file=...)` or a
`local-dir:` folder (with in_chans adaptation and a fresh classifier for another class count),
`features_only=True` (timm's FeatureGetterNet over `forward_intermediates`), `checkpoint_path`.
Built through timm, a model starts with `zero_init_last=True`, as timm's ResNets do (an untrained
model is finite in eval mode); `zero_init_last=False` gives the authors' init.
`GunnLayer` is registered as a leaf for timm's FX feature extraction.

Also here: `save_pretrained` / `from_pretrained` (the Hugging Face folder layout, via timm's
`save_for_hf` and `local-dir:` loading), and `python -m gunn_exp.timm SCRIPT [ARGS]`, which runs
one of timm's scripts (benchmark.py, train.py, validate.py of a pytorch-image-models checkout)
with these models registered.
"""

from __future__ import annotations

import functools
import runpy
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import register_notrace_module
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    model_entrypoint,
    save_for_hf,
)
from timm.models import register_model as timm_register_model
from torch import nn

from gunn_exp.models import GunnLayer, list_models
from gunn_exp.models.registry import build_architecture, pretrained_cfgs

# timm's register_model reads the pretrained cfgs of an entrypoint from its module's
# `default_cfgs` (arch -> its cfgs by tag); register_with_timm fills it.
default_cfgs: dict[str, Any] = {}


# Options timm's builder consumes itself (the rest reach the model's constructor).
FEATURE_OPTIONS = ("features_only", "out_indices", "feature_cls", "pretrained_cfg",
                   "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")  # fmt: skip


def _entrypoint(name: str) -> Any:
    """timm entrypoint for gunn-exp model `name`: timm's builder around our architecture."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        # timm's convention (its ResNets' zero_init_last): every residual branch, here every
        # segment function G_i, starts at 0, so an untrained model in eval mode gives finite
        # outputs. gunn_exp's own create_model and the paper recipes keep the authors' init.
        kwargs.setdefault("zero_init_last", True)
        feature_cfg = {"feature_cls": "getter"}  # FeatureGetterNet over forward_intermediates
        if kwargs.get("features_only") and kwargs.get("out_indices") is None:
            # All taps by default; their number depends on the architecture options, so count
            # them on a model without storage.
            options = {k: v for k, v in kwargs.items() if k not in FEATURE_OPTIONS}
            with torch.device("meta"):
                taps = len(build_architecture(name, **options).feature_info)
            feature_cfg["out_indices"] = tuple(range(taps))
        return build_model_with_cfg(
            functools.partial(build_architecture, name),
            name,
            pretrained,
            feature_cfg=feature_cfg,
            **kwargs,
        )

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"gunn-exp's {name} (docs/MODELS.md; gunn_exp.models.create_model)."
    entrypoint.gunn_exp = True  # type: ignore[attr-defined]
    return entrypoint


def register_with_timm() -> list[str]:
    """Register every gunn-exp model with timm (at import; call again after registering models
    of your own: already registered ones are left alone). Returns the names registered now."""
    register_notrace_module(GunnLayer)
    added = []
    for name in list_models():
        if is_model(name) and getattr(model_entrypoint(name), "gunn_exp", False):
            continue
        cfgs = {f"{name}.{tag}" if tag else name: cfg for tag, cfg in pretrained_cfgs(name).items()}
        default_cfgs.update(generate_default_cfgs(cfgs))
        timm_register_model(_entrypoint(name))
        added.append(name)
    return added


def save_pretrained(model: nn.Module, directory: str | Path, **model_args: Any) -> Path:
    """Write `model` (built by gunn-exp's or timm's create_model) to `directory` in the Hugging
    Face layout timm uses: model.safetensors and config.json (architecture, model arguments,
    pretrained cfg). `model_args` add or replace reconstruction arguments."""
    save_for_hf(model, str(directory), model_args=model_args or None, safe_serialization=True)
    return Path(directory)


def from_pretrained(directory: str | Path, **kwargs: Any) -> nn.Module:
    """The model saved in `directory` by `save_pretrained` (or export.py --format safetensors),
    with its weights; `kwargs` go to timm.create_model (e.g. num_classes for a new head)."""
    return timm.create_model(f"local-dir:{Path(directory).resolve()}", pretrained=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m gunn_exp.timm SCRIPT [ARGS]`: run a timm script with the models registered."""
    args = sys.argv[1:] if argv is None else argv
    if not args or not Path(args[0]).is_file():
        print(
            "usage: python -m gunn_exp.timm SCRIPT [ARGS]  (SCRIPT: e.g. benchmark.py of a "
            "pytorch-image-models checkout)",
            file=sys.stderr,
        )
        return 2
    script = Path(args[0]).resolve()
    sys.argv = [str(script), *args[1:]]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


register_with_timm()

if __name__ == "__main__":
    sys.exit(main())
