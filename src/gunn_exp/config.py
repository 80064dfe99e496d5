"""Config checks that run before anything is built: one error naming the key, value and fix.

Imports neither torch nor Lightning (only the model registry checks do, on demand), so the root
scripts validate a composed config within a few seconds, before the heavy imports.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gunn_exp.errors import ConfigError
from gunn_exp.training.crops import CROP_REDUCTIONS

_MISSING = object()


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _positive_number(v: Any) -> bool:
    return _non_negative_number(v) and v > 0


def _one_of(choices: Callable[[], Sequence[Any]]) -> Callable[[Any], bool]:
    return lambda v: v in choices()


def _model_names() -> list[str]:
    from gunn_exp.models import list_models

    return list_models()


def _impl_names() -> list[Any]:
    from gunn_exp.models import IMPLEMENTATIONS

    return [None, *sorted(IMPLEMENTATIONS)]


# The names ClassificationModule logs during fit; `optimized_metric` must be one of them (test
# metrics are not: choosing a model on the test set would make its test error meaningless).
METRICS = [
    *(f"{stage}/{name}" for stage in ("train", "val") for name in ("loss", "err1", "err5")),
    "val/err1_best",
]

Check = tuple[Callable[[Any], bool], Callable[[], str] | str]

# key -> (predicate, what a valid value looks like). Keys absent from a config are skipped.
# Against the model registry: these import torch.
REGISTRY_CHECKS: dict[str, Check] = {
    "model.name": (_one_of(_model_names), lambda: f"one of {_model_names()}"),
    "model.impl": (_one_of(_impl_names), lambda: f"one of {_impl_names()}"),
}
CHECKS: dict[str, Check] = {
    "seed": (lambda v: v is None or _non_negative_int(v), "null or an integer >= 0"),
    "optimized_metric": (
        _one_of(lambda: METRICS),
        f"a logged metric to minimise, one of {METRICS}",
    ),
    "ten_crop_reduce": (_one_of(lambda: CROP_REDUCTIONS), f"one of {CROP_REDUCTIONS}"),
    "model.update": (_one_of(lambda: ["gradual", "simultaneous"]), "gradual or simultaneous"),
    "model.num_classes": (_positive_int, "a positive integer"),
    "data.batch_size": (_positive_int, "a positive integer (the global batch)"),
    "data.num_workers": (_non_negative_int, "an integer >= 0"),
    "data.image_size": (_positive_int, "a positive integer (pixels)"),
    "trainer.max_epochs": (_positive_int, "a positive integer"),
    "optimizer.lr": (_positive_number, "a positive number"),
    "optimizer.weight_decay": (_non_negative_number, "a number >= 0"),
    "optimizer.momentum": (_non_negative_number, "a number >= 0"),
}


def validate_config(cfg: DictConfig, registry: bool = True) -> None:
    """Raise ConfigError for the first missing or invalid value, before any data or model work.

    `registry=False` skips the checks against the model registry (and its torch import).
    """
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)}; set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    for key, (ok, expected) in (CHECKS | (REGISTRY_CHECKS if registry else {})).items():
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING:
            continue
        if not ok(value):
            hint = expected() if callable(expected) else expected
            raise ConfigError(f"{key}={value!r} is invalid: expected {hint}.")
