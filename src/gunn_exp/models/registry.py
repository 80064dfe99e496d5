"""Model registry: names -> timm-style entrypoints, the paper's models and their pretrained cfgs.

`@register_model(cfgs=...)` files an architecture function (model options -> model) under its
name, with its pretrained cfgs (timm's `pretrained_cfg`, one per tag: `gunn15.cifar10` is the
default of `gunn15`, `gunn15.cifar100` the other), and returns the entrypoint
`name(pretrained=False, **kwargs)`. `create_model(name, **kwargs)` calls it. Both accept timm's
standard arguments: `pretrained`, `pretrained_cfg`, `pretrained_cfg_overlay`, `num_classes`,
`in_chans`, `drop_rate`, `global_pool`, `features_only`, `out_indices`; options a model cannot
honour (`drop_path_rate`, ...) are refused with the reason. `gunn_exp.timm` registers the same
models with timm itself.

A paper model's name fixes its architecture (overriding e.g. its widths is a TypeError), so a
result labelled "gunn15" always comes from GUNN-15; the generic `gunn` builder takes the whole
architecture from the caller (see conf/model/custom_gunn.yaml).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from gunn_exp.models.gunn import Gunn
from gunn_exp.models.pretrained import as_dict, cifar_cfg, imagenet_cfg, load_pretrained
from gunn_exp.models.resnet_cifar import ResNetCifar

Builder = Callable[..., nn.Module]
_ARCHS: dict[str, Builder] = {}  # name -> architecture function (options -> model)
_MODELS: dict[str, Builder] = {}  # name -> entrypoint (pretrained=False, **kwargs -> model)
_CFGS: dict[str, dict[str, dict]] = {}  # name -> tag -> pretrained cfg; the first tag is default

# timm options these models cannot honour, refused unless left at their no-op value.
UNSUPPORTED = {
    "drop_path_rate": "GUNN layers have no residual branch for stochastic depth to drop",
    "drop_block_rate": "the models have no DropBlock layers",
    "bn_momentum": "BatchNorm momentum is fixed at PyTorch's default",
    "bn_eps": "BatchNorm eps is fixed at PyTorch's default",
}
SIMULTANEOUS = {"update": "simultaneous"}


def _cifar_cfgs(pool_size: tuple[int, int] | None = (8, 8)) -> dict[str, dict]:
    return {d: cifar_cfg(d, pool_size) for d in ("cifar10", "cifar100")}


def _imagenet_cfgs(pool_size: tuple[int, int] | None = (7, 7)) -> dict[str, dict]:
    return {"in1k": imagenet_cfg(pool_size)}


def register_model(fn: Builder | None = None, *, cfgs: dict[str, dict] | None = None) -> Any:
    """Decorator, bare or with `cfgs` (tag -> pretrained cfg, the first is the default): file
    architecture function `fn` under `fn.__name__` and return its timm-style entrypoint.

    `fn`'s return annotation names the model class; options are checked against that class's
    constructor.
    """

    def register(fn: Builder) -> Builder:
        name = fn.__name__
        if name in _ARCHS:
            raise ValueError(f"register_model: a model named {name!r} is already registered.")
        _ARCHS[name] = fn
        _CFGS[name] = {
            tag: {**cfg, "architecture": name, "tag": tag}
            for tag, cfg in (cfgs or {"": {}}).items()
        }

        @functools.wraps(fn)
        def entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
            return create_model(name, pretrained, **kwargs)

        _MODELS[name] = entrypoint
        return entrypoint

    return register if fn is None else register(fn)


def list_models() -> list[str]:
    """Registered model names (without pretrained tags), sorted."""
    return sorted(_MODELS)


def pretrained_cfgs(name: str) -> dict[str, dict]:
    """Model `name`'s pretrained cfgs by tag (the default first), as new dicts."""
    _check_name(name)
    return {tag: dict(cfg) for tag, cfg in _CFGS[name].items()}


def resolve_pretrained_cfg(
    name: str,
    pretrained_cfg: str | dict | Any | None = None,
    pretrained_cfg_overlay: dict | None = None,
) -> dict:
    """The pretrained cfg for `name` ("arch" or "arch.tag"): the registered one of the tag (or a
    tag given as `pretrained_cfg`), or `pretrained_cfg` itself (a dict or timm PretrainedCfg),
    updated with `pretrained_cfg_overlay`."""
    arch, _, tag = name.partition(".")
    _check_name(arch)
    if isinstance(pretrained_cfg, str):
        tag, pretrained_cfg = pretrained_cfg, None
    if pretrained_cfg is None:
        cfgs = _CFGS[arch]
        tag = tag or next(iter(cfgs))
        if tag not in cfgs:
            raise ValueError(f"{arch}: unknown pretrained tag {tag!r}; choose one of {list(cfgs)}.")
        cfg = dict(cfgs[tag])
    else:
        cfg = {"architecture": arch, **as_dict(pretrained_cfg)}
    return {**cfg, **(pretrained_cfg_overlay or {})}


def build_architecture(name: str, **kwargs: Any) -> nn.Module:
    """The bare model `name` from constructor options (no pretrained cfg, no weights): what
    `create_model` and timm's builder call. Refuses options the model cannot honour."""
    _check_name(name)
    for key, why in UNSUPPORTED.items():
        value = kwargs.pop(key, None)
        if value:
            raise ValueError(f"{name}: cannot honour {key}={value} ({why}); leave it unset.")
    fn = _ARCHS[name]
    model_cls = typing.get_type_hints(fn).get("return")
    if isinstance(model_cls, type):  # unannotated builders get Python's own TypeError instead
        accepted = set(inspect.signature(model_cls).parameters)
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(
                f"create_model({name!r}): unknown option(s) {unknown}; "
                f"accepted: {sorted(accepted)}."
            )
    return fn(**kwargs)


def create_model(
    name: str,
    pretrained: bool = False,
    pretrained_cfg: str | dict | Any | None = None,
    pretrained_cfg_overlay: dict | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model `name` ("arch" or "arch.tag"), timm's way.

    Options set to None are dropped (timm's convention); `num_classes` and `in_chans` default to
    the pretrained cfg's. `pretrained=True` loads the weights the cfg points to (e.g.
    `pretrained_cfg_overlay=dict(file="export/model.safetensors")`); a classifier of another
    class count stays freshly initialised. `features_only=True` returns a `FeatureExtractor`
    giving the feature taps `out_indices` (default all). The model's `pretrained_cfg` is the
    resolved cfg (what `timm.data.resolve_data_config` reads).

    Raises:
        ValueError: unknown name (the message lists the registered ones), unknown tag, or an
            option the model cannot honour (e.g. drop_path_rate=0.1).
        TypeError: an option the model's constructor does not take (the message lists the
            accepted ones), or one that a paper model fixes (e.g. widths for gunn15).
    """
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
    return FeatureExtractor(model, out_indices) if features_only else model


class FeatureInfo:
    """The feature taps an extractor returns: timm's FeatureInfo accessors over the model's
    `feature_info` dicts (num_chs, reduction, module)."""

    def __init__(self, info: list[dict], out_indices: Sequence[int]) -> None:
        self.info = [dict(d, index=i) for i, d in enumerate(info)]
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, int):
            return self.info[idx][key]
        return [self.info[i][key] for i in idx]

    def get_dicts(self) -> list[dict]:
        return [self.info[i] for i in self.out_indices]

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def __len__(self) -> int:
        return len(self.out_indices)


class FeatureExtractor(nn.Module):
    """`features_only=True`: image batch -> list of feature maps at the taps `out_indices` (timm's
    FeatureGetterNet, without timm). Stages after the last tap and the head are dropped."""

    def __init__(self, model: nn.Module, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.out_indices = model.prune_intermediate_layers(out_indices, prune_norm=True)
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.pretrained_cfg = model.pretrained_cfg
        self.model = model

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(
            x, indices=self.out_indices, intermediates_only=True
        )


def _check_name(name: str) -> None:
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; choose one of {list_models()}.")


# The paper's architectures (docs/SPEC.md §2); the SUNN twins share them.
GUNN15 = {
    "stem": "cifar",
    "stem_width": 64,
    "widths": (240, 300, 360),
    "segments": (20, 25, 30),
    "head_width": 360,
}
GUNN24 = {**GUNN15, "widths": (780, 975, 1170), "layers_per_stage": 2, "head_width": 1170}
GUNN18 = {
    "stem": "imagenet",
    "stem_width": 64,
    "widths": (400, 800, 1600, 2000),
    "segments": (10, 20, 40, 50),
    "projection": False,
    "pool": "after",
}
WIDE_GUNN18 = {
    **GUNN18,
    "widths": (480, 960, 1920, 2400),
    "segments": (24, 48, 96, 120),
    "projection": True,
}
GUNN_MINI = {"stem": "cifar", "stem_width": 32, "widths": (32, 48, 64), "segments": (2, 3, 4)}


@register_model(cfgs=_cifar_cfgs())
def gunn15(**options: Any) -> Gunn:
    """GUNN-15 (CIFAR; authors' gunn-15.lua). 1,585,746 parameters with 10 classes."""
    return Gunn(**GUNN15, **options)


@register_model(cfgs=_cifar_cfgs())
def gunn24(**options: Any) -> Gunn:
    """GUNN-24 (CIFAR), RECONSTRUCTED: the paper gives only depth 24 and 29.6M parameters.

    GUNN-15's skeleton, widths x3.25 (o = 39 with GUNN-15's K) and two GUNN layers per stage
    (docs/SPEC.md §2). 29,649,276 parameters with 10 classes.
    """
    return Gunn(**GUNN24, **options)


@register_model(cfgs=_imagenet_cfgs())
def gunn18(**options: Any) -> Gunn:
    """GUNN-18 (ImageNet; authors' gunn-18.lua). 28,909,736 parameters with 1000 classes."""
    return Gunn(**GUNN18, **options)


@register_model(cfgs=_imagenet_cfgs())
def wide_gunn18(**options: Any) -> Gunn:
    """Wide GUNN-18 (ImageNet), RECONSTRUCTED: the paper gives only 45.6M parameters.

    GUNN-18's skeleton with widths 480-2400, segment width 20 and the projection branch on
    (docs/SPEC.md §2). 45,606,696 parameters with 1000 classes.
    """
    return Gunn(**WIDE_GUNN18, **options)


@register_model(cfgs=_cifar_cfgs())
def gunn_mini(**options: Any) -> Gunn:
    """Compact CIFAR-style GUNN for CPU demos; not a paper model. 119,050 parameters (10 classes).

    Segment width 16 in every stage. On sklearn digits at 16x16, 15 epochs (cosine lr from 0.1)
    reach under 1% test error in about 30 s on one CPU core.
    """
    return Gunn(**GUNN_MINI, **options)


# The generic builder's pool size depends on the architecture it is given, hence None.
@register_model(cfgs={**_cifar_cfgs(pool_size=None), **_imagenet_cfgs(pool_size=None)})
def gunn(**options: Any) -> Gunn:
    """Any GUNN: the caller gives the whole architecture (Gunn's constructor arguments).

    Its default pretrained cfg is CIFAR-10's; use the tag `gunn.in1k` for an ImageNet layout.
    """
    return Gunn(**options)


# SUNN twins (docs/SPEC.md §1 ablation): the same modules and parameters, every segment reads the
# layer's input. `update` stays overridable so one config can switch between the two.
@register_model(cfgs=_cifar_cfgs())
def sunn15(**options: Any) -> Gunn:
    """GUNN-15 updated simultaneously (SUNN-15)."""
    return Gunn(**GUNN15, **{**SIMULTANEOUS, **options})


@register_model(cfgs=_cifar_cfgs())
def sunn24(**options: Any) -> Gunn:
    """Reconstructed GUNN-24 updated simultaneously (SUNN-24)."""
    return Gunn(**GUNN24, **{**SIMULTANEOUS, **options})


@register_model(cfgs=_imagenet_cfgs())
def sunn18(**options: Any) -> Gunn:
    """GUNN-18 updated simultaneously (SUNN-18)."""
    return Gunn(**GUNN18, **{**SIMULTANEOUS, **options})


@register_model(cfgs=_imagenet_cfgs())
def wide_sunn18(**options: Any) -> Gunn:
    """Reconstructed Wide GUNN-18 updated simultaneously (Wide SUNN-18)."""
    return Gunn(**WIDE_GUNN18, **{**SIMULTANEOUS, **options})


@register_model(cfgs=_cifar_cfgs())
def sunn_mini(**options: Any) -> Gunn:
    """gunn_mini updated simultaneously."""
    return Gunn(**GUNN_MINI, **{**SIMULTANEOUS, **options})


@register_model(cfgs=_cifar_cfgs(pool_size=(4, 4)))
def resnet18_cifar(**options: Any) -> ResNetCifar:
    """CIFAR ResNet-18 (3x3 stem, no max pool): a yardstick for benchmarks, not a GUNN."""
    return ResNetCifar(**options)
