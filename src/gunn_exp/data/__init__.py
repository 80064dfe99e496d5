"""LightningDataModules: CIFAR-10/100, ImageNet, scikit-learn digits and synthetic data.

The data modules load on first use (PEP 562), so that light modules of this package (`crops`,
read by the config checks before torch loads) can be imported on their own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunn_exp.data.base import ImageDataModule
    from gunn_exp.data.cifar import CIFARDataModule
    from gunn_exp.data.digits import DigitsDataModule
    from gunn_exp.data.imagenet import ImageNetDataModule
    from gunn_exp.data.synthetic import SyntheticDataModule
    from gunn_exp.errors import DataError

_HOMES = {
    "CIFARDataModule": "gunn_exp.data.cifar",
    "DataError": "gunn_exp.errors",
    "DigitsDataModule": "gunn_exp.data.digits",
    "ImageDataModule": "gunn_exp.data.base",
    "ImageNetDataModule": "gunn_exp.data.imagenet",
    "SyntheticDataModule": "gunn_exp.data.synthetic",
}
__all__ = [
    "CIFARDataModule",
    "DataError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
