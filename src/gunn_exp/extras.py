"""lightning-hydra-template's `extras`, for every entry point that composes a config (train.py,
eval.py): Python warnings silenced on request, and the resolved config shown as a tree."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf


def apply_extras(cfg: DictConfig, fields: Sequence[str]) -> None:
    """`extras.ignore_warnings`, and `extras.print_config` (the tree of `fields`)."""
    if cfg.extras.ignore_warnings:
        warnings.filterwarnings("ignore")
    if cfg.extras.print_config:
        print_config(cfg, fields)


def print_config(cfg: DictConfig, fields: Sequence[str]) -> None:
    """Show the resolved config as a tree, one branch per top-level group."""
    from rich import print as rprint
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for field in fields:
        value = cfg.get(field)
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(field).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    rprint(tree)
