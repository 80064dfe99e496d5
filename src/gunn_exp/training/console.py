"""What a run shows on the console: lightning-hydra-template's `extras` (warnings, the resolved
config as a tree) at the start and the results in a few lines at the end."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONFIG_TREE = ("data", "model", "optimizer", "scheduler", "trainer", "seed")


def apply_extras(cfg: DictConfig) -> None:
    """The template's switches: `extras.ignore_warnings`, `extras.print_config`."""
    if cfg.extras.ignore_warnings:
        warnings.filterwarnings("ignore")
    if cfg.extras.print_config:
        print_config(cfg, CONFIG_TREE)


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


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The closing lines of a run: what was trained and how well."""

    def pct(key: str) -> str:
        value = results.get(key)
        return "n/a" if value is None else f"{value:.2f}%"

    return [
        f"model {results['model']} ({results['params']:,} params) on {results['data']}, "
        f"{results['epochs']} epochs in {results['wall_time_s']:.1f}s",
        f"test  top-1 error {pct('test_err1')}   top-5 error {pct('test_err5')}   (final epoch)",
        f"val   top-1 error {pct('best_val_err1')} best (epoch {results.get('best_val_epoch')}), "
        f"{pct('final_val_err1')} final",
        f"run directory: {results['output_dir']}",
    ]
