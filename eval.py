"""Re-evaluate a finished run: `python eval.py run_dir=<run> [ckpt=last] [data=...] [ten_crop=true]`
or `python eval.py ckpt_path=<run>/checkpoints/last.ckpt` (conf/eval.yaml, docs/USING_MODELS.md).
"""

import hydra
from omegaconf import DictConfig

from gunn_exp import cli

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from gunn_exp.inference.evaluate import evaluate

    with cli.exits_on_error():
        evaluate(cfg)


if __name__ == "__main__":
    main()
