"""What the wandb dashboard costs: the digits experiment with `logger=wandb` (offline) against
`logger=none`, interleaved runs on the same machine, time per epoch from each run's results.json
(`trainer.fit`'s wall time, logging, plots and checkpoints included, over its epochs).

    python benchmarks/logging_cost.py [--repeats 4] [extra train.py overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGGERS = {
    "none": ["logger=none"],
    "wandb": ["logger=wandb"],
    "wandb+log_model": ["logger=wandb", "logger.wandb.log_model=true"],
}


def epoch_seconds(run_dir: Path, *overrides: str) -> float:
    """One `train.py experiment=digits` run; its fit wall time per epoch."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(run_dir.parent / "wandb-data")}  # fmt: skip
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=digits", "test=false",
         "print_config=false", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    results = json.loads((run_dir / "results.json").read_text())
    return results["wall_time_s"] / results["epochs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    args, overrides = parser.parse_known_args()
    times: dict[str, list[float]] = {name: [] for name in LOGGERS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, logger in LOGGERS.items():  # interleaved: drifts in load hit all alike
                run_dir = Path(tmp) / f"{name}-{repeat}"
                times[name].append(epoch_seconds(run_dir, *logger, *overrides))
    base = statistics.median(times["none"])
    print("| logger | s / epoch (median) | runs | vs logger=none |")
    print("|---|---:|---|---:|")
    for name, values in times.items():
        runs = ", ".join(f"{v:.3f}" for v in values)
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {runs} | {median / base:.3f} |")


if __name__ == "__main__":
    main()
