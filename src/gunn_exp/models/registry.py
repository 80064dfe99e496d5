"""Model registry: names -> builders, and the paper's models as builders.

A builder is a function returning a model; `@register_model` files it under its function name.
`create_model(name, **overrides)` calls it with the caller's options (num_classes, in_chans,
update, impl, drop_rate, ...). A paper model's name fixes its architecture (overriding e.g. its
widths is a TypeError), so a result labelled "gunn15" always comes from GUNN-15; the generic `gunn`
builder takes the whole architecture from the caller (see conf/model/custom_gunn.yaml).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

from torch import nn

from gunn_exp.models.gunn import Gunn
from gunn_exp.models.resnet_cifar import ResNetCifar

Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}
SIMULTANEOUS = {"update": "simultaneous"}
IMAGENET = {"num_classes": 1000}  # default class count of the ImageNet models


def register_model(fn: Builder) -> Builder:
    """Decorator: make `fn` available to `create_model` under `fn.__name__`.

    The builder's return annotation names the model class; `create_model` checks overrides
    against that class's constructor.
    """
    if fn.__name__ in _MODELS:
        raise ValueError(f"register_model: a model named {fn.__name__!r} is already registered.")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered model `name`; `overrides` go to its constructor.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
        TypeError: an override the model's constructor does not take (the message lists the
            accepted ones), or one that a paper model fixes (e.g. widths for gunn15).
    """
    if name not in _MODELS:
        raise ValueError(f"create_model: unknown model {name!r}; choose one of {list_models()}.")
    builder = _MODELS[name]
    model_cls = typing.get_type_hints(builder).get("return")
    if isinstance(model_cls, type):  # unannotated builders get Python's own TypeError instead
        accepted = set(inspect.signature(model_cls).parameters)
        unknown = sorted(set(overrides) - accepted)
        if unknown:
            raise TypeError(
                f"create_model({name!r}): unknown option(s) {unknown}; "
                f"accepted: {sorted(accepted)}."
            )
    return builder(**overrides)


@register_model
def gunn15(**options: Any) -> Gunn:
    """GUNN-15 (CIFAR; authors' gunn-15.lua). 1,585,746 parameters with 10 classes."""
    return Gunn(
        stem="cifar",
        stem_width=64,
        widths=(240, 300, 360),
        segments=(20, 25, 30),
        head_width=360,
        **options,
    )


@register_model
def gunn24(**options: Any) -> Gunn:
    """GUNN-24 (CIFAR), RECONSTRUCTED: the paper gives only depth 24 and 29.6M parameters.

    GUNN-15's skeleton, widths x3.25 (o = 39 with GUNN-15's K) and two GUNN layers per stage
    (SPEC §2). 29,649,276 parameters with 10 classes.
    """
    return Gunn(
        stem="cifar",
        stem_width=64,
        widths=(780, 975, 1170),
        segments=(20, 25, 30),
        layers_per_stage=2,
        head_width=1170,
        **options,
    )


@register_model
def gunn18(**options: Any) -> Gunn:
    """GUNN-18 (ImageNet; authors' gunn-18.lua). 28,909,736 parameters with 1000 classes."""
    return Gunn(
        stem="imagenet",
        stem_width=64,
        widths=(400, 800, 1600, 2000),
        segments=(10, 20, 40, 50),
        projection=False,
        pool="after",
        **{**IMAGENET, **options},
    )


@register_model
def wide_gunn18(**options: Any) -> Gunn:
    """Wide GUNN-18 (ImageNet), RECONSTRUCTED: the paper gives only 45.6M parameters.

    GUNN-18's skeleton with widths 480-2400, segment width 20 and the projection branch on
    (SPEC §2). 45,606,696 parameters with 1000 classes.
    """
    return Gunn(
        stem="imagenet",
        stem_width=64,
        widths=(480, 960, 1920, 2400),
        segments=(24, 48, 96, 120),
        projection=True,
        pool="after",
        **{**IMAGENET, **options},
    )


@register_model
def gunn_mini(**options: Any) -> Gunn:
    """Compact CIFAR-style GUNN for CPU demos; not a paper model. 119,050 parameters (10 classes).

    Segment width 16 in every stage. On sklearn digits at 16x16, 15 epochs (cosine lr from 0.1)
    reach under 1% test error in about 30 s on one CPU core.
    """
    return Gunn(stem="cifar", stem_width=32, widths=(32, 48, 64), segments=(2, 3, 4), **options)


@register_model
def gunn(**options: Any) -> Gunn:
    """Any GUNN: the caller gives the whole architecture (Gunn's constructor arguments)."""
    return Gunn(**options)


# SUNN twins (SPEC §1 ablation): the same modules and parameters, every segment reads the layer's
# input. `update` stays overridable so one config can switch between the two.
@register_model
def sunn15(**options: Any) -> Gunn:
    """GUNN-15 updated simultaneously (SUNN-15)."""
    return gunn15(**{**SIMULTANEOUS, **options})


@register_model
def sunn24(**options: Any) -> Gunn:
    """Reconstructed GUNN-24 updated simultaneously (SUNN-24)."""
    return gunn24(**{**SIMULTANEOUS, **options})


@register_model
def sunn18(**options: Any) -> Gunn:
    """GUNN-18 updated simultaneously (SUNN-18)."""
    return gunn18(**{**SIMULTANEOUS, **options})


@register_model
def wide_sunn18(**options: Any) -> Gunn:
    """Reconstructed Wide GUNN-18 updated simultaneously (Wide SUNN-18)."""
    return wide_gunn18(**{**SIMULTANEOUS, **options})


@register_model
def sunn_mini(**options: Any) -> Gunn:
    """gunn_mini updated simultaneously."""
    return gunn_mini(**{**SIMULTANEOUS, **options})


@register_model
def resnet18_cifar(**options: Any) -> ResNetCifar:
    """CIFAR ResNet-18 (3x3 stem, no max pool): a yardstick for benchmarks, not a GUNN."""
    return ResNetCifar(**options)
