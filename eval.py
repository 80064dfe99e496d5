"""Re-evaluate a finished run: `python eval.py run_dir=<run> [ckpt=last] [data=...] [ten_crop=true]`
(see conf/eval.yaml and docs/USING_MODELS.md)."""

import os
import sys
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from gunn_exp.checkpointing import CheckpointError  # noqa: E402
from gunn_exp.config import ConfigError, register_resolvers  # noqa: E402
from gunn_exp.evaluate import evaluate  # noqa: E402
from gunn_exp.inference import RunError  # noqa: E402

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (ConfigError, RunError, CheckpointError, FileNotFoundError) as err:  # data missing
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
