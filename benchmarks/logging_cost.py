"""What the wandb dashboard costs per epoch: the digits experiment with `logger=wandb` (offline)
against `logger=none`, interleaved runs on the same machine.

Each logger runs at two lengths; the cost of one epoch is the difference divided by the extra
epochs, so what every run pays once (imports, wandb's start and finish, the final artifacts)
drops out. Two clocks: the wall time of `trainer.fit` (results.json) and the CPU time of the whole
run, every process included (wandb's own service too), which a busy shared machine disturbs less.

    python benchmarks/logging_cost.py [--repeats 3] [--epochs 3 12] [extra train.py overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGGERS = {
    "none": ["logger=none"],
    "wandb": ["logger=wandb"],
    "wandb, log_model=true": ["logger=wandb", "logger.wandb.log_model=true"],
}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(run_dir: Path, epochs: int, *overrides: str) -> tuple[float, float]:
    """One `train.py experiment=digits` run: (fit wall seconds, CPU seconds of its processes)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(run_dir.parent / "wandb-data")}  # fmt: skip
    cpu = children_cpu()
    subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "experiment=digits", "test=false",
         f"trainer.max_epochs={epochs}", "print_config=false", f"hydra.run.dir={run_dir}",
         *overrides],
        cwd=ROOT, env=env, check=True, capture_output=True,
    )  # fmt: skip
    return json.loads((run_dir / "results.json").read_text())["wall_time_s"], children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs=2, default=(3, 12))
    args, overrides = parser.parse_known_args()
    short, long = args.epochs
    per_epoch: dict[str, list[tuple[float, float]]] = {name: [] for name in LOGGERS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for i, (name, logger) in enumerate(LOGGERS.items()):  # interleaved: load drifts
                wall0, cpu0 = run(Path(tmp) / f"{i}-{repeat}-short", short, *logger, *overrides)
                wall1, cpu1 = run(Path(tmp) / f"{i}-{repeat}-long", long, *logger, *overrides)
                extra = long - short
                per_epoch[name].append(((wall1 - wall0) / extra, (cpu1 - cpu0) / extra))
    base_wall = statistics.median(w for w, _ in per_epoch["none"])
    base_cpu = statistics.median(c for _, c in per_epoch["none"])
    print(f"digits, epochs {short} and {long}, {args.repeats} repeats, medians per epoch")
    print("| logger | wall s / epoch | vs none | CPU s / epoch | vs none | runs (wall / CPU) |")
    print("|---|---:|---:|---:|---:|---|")
    for name, values in per_epoch.items():
        wall = statistics.median(w for w, _ in values)
        cpu = statistics.median(c for _, c in values)
        runs = ", ".join(f"{w:.2f}/{c:.2f}" for w, c in values)
        print(f"| {name} | {wall:.3f} | {wall / base_wall:.3f} | {cpu:.3f} | {cpu / base_cpu:.3f} "
              f"| {runs} |")  # fmt: skip


if __name__ == "__main__":
    main()
