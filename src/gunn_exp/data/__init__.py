"""LightningDataModules: CIFAR-10/100, ImageNet, scikit-learn digits and synthetic data."""

from gunn_exp.data.base import ImageDataModule
from gunn_exp.data.cifar import CIFARDataModule
from gunn_exp.data.digits import DigitsDataModule
from gunn_exp.data.imagenet import ImageNetDataModule
from gunn_exp.data.synthetic import SyntheticDataModule
from gunn_exp.errors import DataError

__all__ = [
    "CIFARDataModule",
    "DataError",
    "DigitsDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "SyntheticDataModule",
]
