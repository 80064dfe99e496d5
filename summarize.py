"""Complexity report of a model: `python summarize.py model=gunn24 data=cifar100`.

Options in conf/summarize.yaml (format=markdown, zoo=true, device=cuda, ...); the work is done by
gunn_exp.complexity.
"""

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from gunn_exp.complexity import print_summary, print_zoo, summarize, summarize_paper_models


@hydra.main(version_base="1.3", config_path="conf", config_name="summarize")
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.format not in ("rich", "markdown"):
        raise ValueError(f"summarize: format={cfg.format!r} is not one of rich, markdown.")
    if cfg.zoo:
        summaries = summarize_paper_models(cfg.model.get("impl"), cfg.activations, cfg.device)
        print_zoo(summaries, cfg.format)
        return
    model = instantiate(cfg.model).to(cfg.device)
    size = cfg.data.image_size
    x = torch.randn(cfg.batch_size, cfg.data.in_chans, size, size, device=cfg.device)
    print_summary(summarize(model, x, cfg.model.name, cfg.data.name, cfg.activations), cfg.format)


if __name__ == "__main__":
    main()
