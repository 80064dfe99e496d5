"""GUNN models: the layer and its implementations, the networks, the registry and the zoo."""

# Imported for what they register: the fast layer implementations and the models.
from gunn_exp.models import recat, resnet_cifar, whole_layer, zoo  # noqa: F401
from gunn_exp.models.factory import create_model
from gunn_exp.models.gunn import Gunn
from gunn_exp.models.layer import IMPLEMENTATIONS, GunnLayer, GunnUnit, register_impl
from gunn_exp.models.registry import list_models, register_model

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
