"""`create_model`: a registered model by name, built timm's way.

The registry (`gunn_exp.models.registry`) turns a name into an architecture and its pretrained cfg;
this module adds what timm's `create_model` does around that, without timm: options set to None
dropped, `num_classes` and `in_chans` from the cfg, the resolved cfg attached to the model, the
weights loaded (`gunn_exp.models.pretrained`) and the feature extractor wrapped around it
(`gunn_exp.models.features`). `gunn_exp.timm` does the same through timm's own builder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gunn_exp.models.features import FeatureExtractor
from gunn_exp.models.gunnify import gunnify as convert_blocks
from gunn_exp.models.gunnify import gunnify_options
from gunn_exp.models.pretrained import load_checkpoint_weights, load_pretrained
from gunn_exp.models.registry import build_architecture, resolve_pretrained_cfg

log = logging.getLogger(__name__)


def create_model(
    name: str,
    pretrained: bool = False,
    pretrained_cfg: str | dict | Any | None = None,
    pretrained_cfg_overlay: dict | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    gunnify: Mapping[str, Any] | None = None,
    checkpoint_path: str | Path | None = None,
    scriptable: bool | None = None,
    exportable: bool | None = None,
    no_jit: bool | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model `name` ("arch" or "arch.tag"), timm's way.

    Accepts timm's standard arguments: `pretrained`, `pretrained_cfg`, `pretrained_cfg_overlay`,
    `num_classes`, `in_chans`, `drop_rate`, `global_pool`, `features_only`, `out_indices`; options
    a model cannot honour (`drop_path_rate`, ...) are refused with the reason. Options set to None
    are dropped (timm's convention); `num_classes` and `in_chans` default to the pretrained
    cfg's. `pretrained=True` loads the weights the cfg points to (e.g.
    `pretrained_cfg_overlay=dict(file="export/model.safetensors")`); a classifier of another
    class count stays freshly initialised. `features_only=True` returns a `FeatureExtractor`
    giving the feature taps `out_indices` (default all). The model's `pretrained_cfg` is the
    resolved cfg (what `timm.data.resolve_data_config` reads). `gunnify` (`gunnify`'s options:
    `segments`, `update`, `mode`, `blocks`; `segments` None: off) gives the model's residual
    blocks the gradual update after the weights are loaded (models/gunnify.py).
    `checkpoint_path` (timm's): plain weights (.safetensors, a torch file of tensors, export.py's
    folder) loaded after the pretrained ones, every tensor matching, classifier included; a
    training checkpoint (.ckpt) is refused with the export command (its pickle is not read).
    `scriptable`, `exportable` and `no_jit` (timm's layer-config flags) are accepted and change
    nothing: every registered model already scripts (`torch.jit.script`) and exports
    (`torch.export`, ONNX) as built.

    Raises:
        ValueError: unknown name (the message lists the registered ones), unknown tag, or an
            option the model cannot honour (e.g. drop_path_rate=0.1); a ConfigError for
            `gunnify` options that cannot apply to the model.
        TypeError: an option the model's constructor does not take (the message lists the
            accepted ones), or one that a paper model fixes (e.g. widths for gunn15).
    """
    del scriptable, exportable, no_jit  # see the docstring: nothing to switch
    arch = name.partition(".")[0]
    cfg = resolve_pretrained_cfg(name, pretrained_cfg, pretrained_cfg_overlay)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if cfg.get("num_classes") is not None:
        kwargs.setdefault("num_classes", cfg["num_classes"])
    if cfg.get("input_size"):
        kwargs.setdefault("in_chans", cfg["input_size"][0])
    model = build_architecture(arch, **kwargs)
    model.pretrained_cfg = model.default_cfg = cfg
    model._model_args = kwargs  # where timm reads reconstruction arguments (save_for_hf)
    if pretrained:
        load_pretrained(model, cfg, arch)
    if checkpoint_path:
        load_checkpoint_weights(model, checkpoint_path, arch)
    options = gunnify_options(gunnify)
    if options is not None:
        log.info(convert_blocks(model, **options).summary())
    return FeatureExtractor(model, out_indices) if features_only else model
