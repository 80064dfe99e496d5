"""Train a model: `python train.py model=gunn15 data=cifar10` (see conf/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

from gunn_exp import cli
from gunn_exp.config import validate_config

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with cli.exits_on_error(sweep_job=True):
        validate_config(cfg, registry=False)  # a config error in seconds, before torch loads
        from gunn_exp.training.train import train

        results = train(cfg, from_command_line=True)
    # What a sweeper (e.g. Optuna) minimises: the metric conf/train.yaml names.
    return results["metrics"].get(cfg.optimized_metric)


if __name__ == "__main__":
    cli.refuse_template_keys(sys.argv[1:])
    main()
