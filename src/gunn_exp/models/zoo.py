"""The paper's GUNN models and their SUNN twins, registered by name (docs/SPEC.md §2).

Each builder is one `Gunn` call with the numbers of one architecture; `create_model("gunn15")`
finds it through the registry. A paper model's name fixes its architecture (overriding e.g. its
widths is a TypeError), so a result labelled "gunn15" always comes from GUNN-15; the generic
`gunn` builder takes the whole architecture from the caller (see conf/model/custom_gunn.yaml).

Every GUNN here has a SUNN twin (`simultaneous_twin`, the paper's ablation, docs/SPEC.md §1): the
same modules and parameters, every segment reads the layer's input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunn_exp.models.gunn import Gunn
from gunn_exp.models.pretrained import cifar_cfgs, imagenet_cfgs
from gunn_exp.models.registry import build_fixed, pretrained_cfgs, register_model

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
SIMULTANEOUS = {"update": "simultaneous"}
# How to build a GUNN of another architecture than a named one's.
OWN_GUNN = (
    "build `gunn` with the whole architecture (model=custom_gunn, or "
    "create_model('gunn', widths=..., segments=...))"
)


@register_model(cfgs=cifar_cfgs())
def gunn15(**options: Any) -> Gunn:
    """GUNN-15 (CIFAR; authors' gunn-15.lua). 1,585,746 parameters with 10 classes."""
    return build_fixed("gunn15", Gunn, GUNN15, options, OWN_GUNN)


@register_model(cfgs=cifar_cfgs())
def gunn24(**options: Any) -> Gunn:
    """GUNN-24 (CIFAR), RECONSTRUCTED: the paper gives only depth 24 and 29.6M parameters.

    GUNN-15's skeleton, widths x3.25 (o = 39 with GUNN-15's K) and two GUNN layers per stage
    (docs/SPEC.md §2). 29,649,276 parameters with 10 classes.
    """
    return build_fixed("gunn24", Gunn, GUNN24, options, OWN_GUNN)


@register_model(cfgs=imagenet_cfgs())
def gunn18(**options: Any) -> Gunn:
    """GUNN-18 (ImageNet; authors' gunn-18.lua). 28,909,736 parameters with 1000 classes."""
    return build_fixed("gunn18", Gunn, GUNN18, options, OWN_GUNN)


@register_model(cfgs=imagenet_cfgs())
def wide_gunn18(**options: Any) -> Gunn:
    """Wide GUNN-18 (ImageNet), RECONSTRUCTED: the paper gives only 45.6M parameters.

    GUNN-18's skeleton with widths 480-2400, segment width 20 and the projection branch on
    (docs/SPEC.md §2). 45,606,696 parameters with 1000 classes.
    """
    return build_fixed("wide_gunn18", Gunn, WIDE_GUNN18, options, OWN_GUNN)


@register_model(cfgs=cifar_cfgs())
def gunn_mini(**options: Any) -> Gunn:
    """Compact CIFAR-style GUNN for CPU demos; not a paper model. 119,050 parameters (10 classes).

    Segment width 16 in every stage. On sklearn digits at 16x16, 15 epochs (cosine lr from 0.1)
    reach under 1% test error in about 30 s on one CPU core.
    """
    return build_fixed("gunn_mini", Gunn, GUNN_MINI, options, OWN_GUNN)


# The generic builder's pool size depends on the architecture it is given, hence None.
@register_model(cfgs={**cifar_cfgs(pool_size=None), **imagenet_cfgs(pool_size=None)})
def gunn(**options: Any) -> Gunn:
    """Any GUNN: the caller gives the whole architecture (Gunn's constructor arguments).

    Its default pretrained cfg is CIFAR-10's; use the tag `gunn.in1k` for an ImageNet layout.
    """
    missing = [key for key in ("widths", "segments") if key not in options]
    if missing:
        raise TypeError(
            f"create_model('gunn') builds the architecture you give: it needs "
            f"{' and '.join(missing)} (e.g. create_model('gunn', widths=(32, 48, 64), "
            f"segments=(2, 3, 4)), or model=custom_gunn); for a paper model use its name, "
            f"e.g. create_model('gunn15')."
        )
    return Gunn(**options)


def simultaneous_twin(builder: Callable[..., Gunn], name: str) -> Callable[..., Gunn]:
    """Register `name`, the SUNN twin of the registered GUNN `builder`, with its pretrained cfgs.

    The twin builds the same network updated simultaneously. `update` stays overridable so that
    one config can switch between the two.
    """

    def twin(**options: Any) -> Gunn:
        return builder(**{**SIMULTANEOUS, **options})

    twin.__name__ = twin.__qualname__ = name
    twin.__doc__ = f"{builder.__name__} updated simultaneously (the SUNN ablation, SPEC §1)."
    return register_model(twin, cfgs=pretrained_cfgs(builder.__name__))


sunn15 = simultaneous_twin(gunn15, "sunn15")
sunn24 = simultaneous_twin(gunn24, "sunn24")
sunn18 = simultaneous_twin(gunn18, "sunn18")
wide_sunn18 = simultaneous_twin(wide_gunn18, "wide_sunn18")
sunn_mini = simultaneous_twin(gunn_mini, "sunn_mini")
