"""Benchmark the GUNN layer implementations: `python benchmark.py model=gunn15`."""

import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gunn_exp.benchmark import main as run_benchmark  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    run_benchmark(cfg, command=shlex.join(["python", "benchmark.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
