"""Re-evaluate a finished run: `python eval.py run_dir=<run> [ckpt=last] [data=...] [ten_crop=true]`
or `python eval.py ckpt_path=<run>/checkpoints/last.ckpt` (conf/eval.yaml, docs/USING_MODELS.md).
"""

import hydra
from omegaconf import DictConfig

from gunn_exp import cli
from gunn_exp.config import validate_config

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with cli.exits_on_error():
        validate_config(cfg, registry=False)  # a config error in seconds, before torch loads
        from gunn_exp.inference.evaluate import evaluate

        evaluate(cfg)


if __name__ == "__main__":
    main()
