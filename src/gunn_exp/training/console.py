"""What a run shows on the console at its end: the results in a few lines. (At its start:
gunn_exp.extras, the config tree.)"""

from __future__ import annotations

from typing import Any


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
