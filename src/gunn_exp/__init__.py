"""gunn-exp: Gradually Updated Neural Networks, reproduced."""

__version__ = "0.1.0"
