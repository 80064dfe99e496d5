"""Train a model: `python train.py model=gunn15 data=cifar10` (see conf/train.yaml)."""

import hydra
from omegaconf import DictConfig

from gunn_exp import cli

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    from gunn_exp.training.train import train

    with cli.exits_on_error():
        results = train(cfg)
    # Returned for sweepers (e.g. Optuna) that minimise a metric.
    return results.get("best_val_err1")


if __name__ == "__main__":
    main()
