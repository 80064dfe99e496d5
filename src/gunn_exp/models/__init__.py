"""GUNN models: the layer, the network, the registry of paper models."""

from gunn_exp.models import recat, whole_layer  # noqa: F401  (register the fast implementations)
from gunn_exp.models.gunn import Gunn
from gunn_exp.models.layer import IMPLEMENTATIONS, GunnLayer, GunnUnit, register_impl
from gunn_exp.models.registry import create_model, list_models, register_model

__all__ = [
    "IMPLEMENTATIONS",
    "Gunn",
    "GunnLayer",
    "GunnUnit",
    "create_model",
    "list_models",
    "register_impl",
    "register_model",
]
