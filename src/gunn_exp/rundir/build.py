"""Building a stored run's model and data: the one place objects are made from a file's contents.

A config or checkpoint is data a user may have been handed, and Hydra's `instantiate` calls
whatever import path a `_target_` names. So a stored model is rebuilt by registry name
(`create_model(name, **args)`), and a stored data config is instantiated only when its target is
one of gunn_exp's data modules and nothing inside it names another target.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from gunn_exp.errors import RunError, instantiate_config

MODEL_TARGET = "gunn_exp.models.create_model"


def data_targets() -> list[str]:
    """The `_target_`s of gunn_exp's data modules, as the data configs name them."""
    import gunn_exp.data as data

    return sorted(
        f"gunn_exp.data.{name}"
        for name in data.__all__
        if isinstance(cls := getattr(data, name), type)
        and issubclass(cls, data.ImageDataModule)
        and cls is not data.ImageDataModule
    )


def model_spec(model_cfg: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """(registry name, create_model arguments) of a resolved `model` config from `source`."""
    target = model_cfg.get("_target_")
    name = model_cfg.get("name")
    if target != MODEL_TARGET or not isinstance(name, str):
        raise RunError(
            f"{source}: model._target_={target!r}, name={name!r}; a stored model is rebuilt only "
            f"through {MODEL_TARGET} with a registry name (nothing a file names is imported)."
        )
    args = {k: v for k, v in model_cfg.items() if k not in ("_target_", "name")}
    _refuse_targets(args, source, "model")
    return name, args


def build_model(name: str, args: Mapping[str, Any]) -> nn.Module:
    """`create_model(name, **args)`, unset (None) options left to the model's defaults."""
    from gunn_exp.models import create_model

    return create_model(name, **{k: v for k, v in args.items() if v is not None})


def build_datamodule(data_cfg: Mapping[str, Any], source: str) -> Any:
    """The data module a resolved `data` config from `source` describes (checked, then built)."""
    target = data_cfg.get("_target_")
    if target not in data_targets():
        raise RunError(
            f"{source}: data._target_={target!r} is not one of gunn_exp's data modules "
            f"({', '.join(data_targets())}); a stored config cannot name code to run."
        )
    _refuse_targets({k: v for k, v in data_cfg.items() if k != "_target_"}, source, "data")
    return instantiate_config(dict(data_cfg), "data")


def _refuse_targets(node: Any, source: str, where: str) -> None:
    """No nested `_target_`: instantiate would import and call it."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_target_":
                raise RunError(f"{source}: {where} holds a nested _target_={value!r}; refused.")
            _refuse_targets(value, source, f"{where}.{key}")
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            _refuse_targets(value, source, f"{where}[{i}]")
