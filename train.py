"""Train a model: `python train.py model=gunn15 data=cifar10` (see conf/train.yaml)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gunn_exp.checkpointing import CheckpointError  # noqa: E402
from gunn_exp.config import ConfigError, register_resolvers  # noqa: E402
from gunn_exp.data import DataError  # noqa: E402
from gunn_exp.faults import RunStopped  # noqa: E402
from gunn_exp.train import train  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
    except DataError as err:  # missing, corrupt or inconsistent data: bad input, like a config
        print(f"data error: {err}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        sys.exit(1)
    except RunStopped as err:  # a signal (checkpoint saved) or a non-finite loss
        print(f"stopped: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    # Returned for sweepers (e.g. Optuna) that minimise a metric.
    return results.get("best_val_err1")


if __name__ == "__main__":
    main()
