"""GUNN models: the layer, the network, the registry of paper models."""

from gunn_exp.models.layer import IMPLEMENTATIONS, GunnLayer, GunnUnit, register_impl

__all__ = ["IMPLEMENTATIONS", "GunnLayer", "GunnUnit", "register_impl"]
