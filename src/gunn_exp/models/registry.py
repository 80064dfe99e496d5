"""Model registry: names -> architecture functions and their pretrained cfgs.

`@register_model(cfgs=...)` files an architecture function (model options -> model) under its
name, with its pretrained cfgs (timm's `pretrained_cfg`, one per tag: `gunn15.cifar10` is the
default of `gunn15`, `gunn15.cifar100` the other), and returns it unchanged. The files that define
the models register them (`gunn_exp.models.zoo`, `gunn_exp.models.resnet_cifar`); importing
`gunn_exp.models` imports them all.

Here names are resolved: `list_models`, `pretrained_cfgs`, `resolve_pretrained_cfg` ("arch" or
"arch.tag", or a cfg given by the caller -> the cfg) and `build_architecture` (name and options ->
the bare model, refusing the timm options a model cannot honour). Like timm's `_registry.py`, the
module imports nothing of gunn-exp, so any model file can register into it; what builds on it is
`gunn_exp.models.factory.create_model` (weights, feature extraction) and `gunn_exp.timm` (timm's
own builder).
"""

from __future__ import annotations

import fnmatch
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

Builder = Callable[..., Any]  # architecture function: model options -> model
_ARCHS: dict[str, Builder] = {}  # name -> architecture function
_CFGS: dict[str, dict[str, dict]] = {}  # name -> tag -> pretrained cfg; the first tag is default
# The pretrained cfg keys that say where weights are (timm's names).
WEIGHT_SOURCES = ("file", "url", "hf_hub_id", "state_dict")

# timm options these models cannot honour, refused unless left at their no-op value.
UNSUPPORTED = {
    "drop_path_rate": "GUNN layers have no residual branch for stochastic depth to drop",
    "drop_block_rate": "the models have no DropBlock layers",
    "bn_momentum": "BatchNorm momentum is fixed at PyTorch's default",
    "bn_eps": "BatchNorm eps is fixed at PyTorch's default",
}


def register_model(fn: Builder | None = None, *, cfgs: dict[str, dict] | None = None) -> Any:
    """Decorator, bare or with `cfgs` (tag -> pretrained cfg, the first is the default): file
    architecture function `fn` under `fn.__name__` and return `fn`.

    `fn`'s return annotation names the model class; options are checked against that class's
    constructor (`build_architecture`).
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
        return fn

    return register if fn is None else register(fn)


def build_fixed(
    name: str,
    model_cls: Builder,
    architecture: dict[str, Any],
    options: dict[str, Any],
    instead: str,
) -> Any:
    """Model `name`: `model_cls(**architecture, **options)`, where the caller's options are the
    rest (classes, dropout, ...). Overriding the architecture itself is refused, naming
    `instead`, the way to build another: a result labelled `name` always comes from `name`'s
    architecture."""
    fixed = sorted(set(architecture) & set(options))
    if fixed:
        raise TypeError(
            f"{name} fixes {', '.join(fixed)}: a result labelled {name} is always its "
            f"architecture; for your own, {instead}."
        )
    return model_cls(**architecture, **options)


def list_models(
    filter: str | Sequence[str] = "",
    module: str = "",
    pretrained: bool = False,
    exclude_filters: str | Sequence[str] = "",
    include_tags: bool | None = None,
) -> list[str]:
    """Registered model names, sorted, with timm's `list_models` arguments.

    `filter` and `exclude_filters`: shell-style wildcards (`"gunn*"`, `["*sunn*"]`), one or a
    list; a name is kept when it matches any filter and no exclude filter. `module`: only the
    models registered by that file (`"zoo"`, `"resnet_cifar"`). `include_tags`: list
    "arch.tag" names (`gunn15.cifar100`); by default only when `pretrained`. `pretrained`: only
    the cfgs that name a weight source; none is published for these models (see
    models/pretrained.py), so this lists nothing unless a model registers weights.
    """
    include_tags = pretrained if include_tags is None else include_tags
    keep, drop = _patterns(filter), _patterns(exclude_filters)
    names = []
    for arch in _ARCHS:
        if module and _ARCHS[arch].__module__.rpartition(".")[2] != module:
            continue
        for tag, cfg in _CFGS[arch].items():
            if pretrained and not any(cfg.get(source) for source in WEIGHT_SOURCES):
                continue
            names.append(f"{arch}.{tag}" if include_tags and tag else arch)
    return sorted(
        {
            name
            for name in names
            if (not keep or any(fnmatch.fnmatchcase(name, f) for f in keep))
            and not any(fnmatch.fnmatchcase(name, f) for f in drop)
        }
    )


def _patterns(value: str | Sequence[str]) -> list[str]:
    """One wildcard or a list of them, empty ones dropped (timm's "" means no filter)."""
    return [p for p in ([value] if isinstance(value, str) else value) if p]


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
        given = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else pretrained_cfg
        cfg = {"architecture": arch, **given}
    return {**cfg, **(pretrained_cfg_overlay or {})}


def build_architecture(name: str, **kwargs: Any) -> Any:
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


def _check_name(name: str) -> None:
    if name not in _ARCHS:
        raise ValueError(f"create_model: unknown model {name!r}; choose one of {list_models()}.")
