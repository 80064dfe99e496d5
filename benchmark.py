"""Benchmark the GUNN layer implementations: `python benchmark.py model=gunn15`."""

import shlex
import sys

import hydra
from omegaconf import DictConfig

from gunn_exp import cli

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="benchmark")
def main(cfg: DictConfig) -> None:
    from gunn_exp.analysis.benchmark import main as run_benchmark

    with cli.exits_on_error():
        run_benchmark(cfg, command=shlex.join(["python", "benchmark.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
