"""Complexity report of a model: `python summarize.py model=gunn24 data=cifar100`.

Options in conf/summarize.yaml (format=markdown, zoo=true, device=cuda, ...); the work is done by
gunn_exp.analysis.complexity (measuring) and gunn_exp.analysis.complexity_tables (printing).
"""

import hydra
from omegaconf import DictConfig

from gunn_exp import cli
from gunn_exp.errors import ConfigError

cli.prepare(__file__)


@hydra.main(version_base="1.3", config_path="conf", config_name="summarize")
def main(cfg: DictConfig) -> None:
    with cli.exits_on_error():
        summarize_model(cfg)


def summarize_model(cfg: DictConfig) -> None:
    if cfg.format not in ("rich", "markdown"):
        raise ConfigError(f"format={cfg.format!r} is invalid: expected rich or markdown.")
    import torch
    from hydra.utils import instantiate

    from gunn_exp.analysis.complexity import summarize, summarize_paper_models
    from gunn_exp.analysis.complexity_tables import print_summary, print_zoo

    torch.manual_seed(cfg.seed)
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
