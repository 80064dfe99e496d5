"""`results.json`: the numbers a finished run is judged by, and their one-screen summary."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    path = Path(output_dir) / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The per-epoch rows of a `metrics.csv` written by EpochSummary, as floats; [] if absent."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [
            {k: float(v) for k, v in row.items() if v not in ("", None)}
            for row in csv.DictReader(f)
        ]


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
