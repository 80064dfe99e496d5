"""Config composition: every model x data pair composes, resolves and passes validation."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose_train
from omegaconf import OmegaConf

from gunn_exp.config import validate_config
from gunn_exp.errors import ConfigError
from gunn_exp.training.schedules import epoch_milestones, register_resolvers

register_resolvers()
MODELS = sorted(p.stem for p in (ROOT / "conf/model").glob("*.yaml"))
DATA = sorted(p.stem for p in (ROOT / "conf/data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
OPTIMIZERS = sorted(p.stem for p in (ROOT / "conf/optimizer").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in (ROOT / "conf/scheduler").glob("*.yaml"))


@pytest.mark.parametrize("data", DATA)
@pytest.mark.parametrize("model", MODELS)
def test_every_model_and_data_compose(model: str, data: str) -> None:
    cfg = compose_train(f"model={model}", f"data={data}")
    validate_config(cfg)
    assert cfg.model.num_classes == cfg.data.num_classes
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    cfg = compose_train(f"experiment={experiment}")
    validate_config(cfg)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_and_scheduler_build(optimizer: str, scheduler: str) -> None:
    """What Lightning builds in configure_optimizers, for every pair of the two groups."""
    import torch

    from gunn_exp.training.train import build_module, build_network

    cfg = compose_train("experiment=digits", f"optimizer={optimizer}", f"scheduler={scheduler}")
    validate_config(cfg)
    built = build_module(cfg, build_network(cfg)).configure_optimizers()
    opt = built["optimizer"] if isinstance(built, dict) else built
    assert type(opt).__name__.lower() == optimizer.replace("_", "")
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] > 0


def test_validation_names_key_and_value() -> None:
    cfg = compose_train("data.batch_size=0")
    with pytest.raises(ConfigError, match=r"data\.batch_size=0"):
        validate_config(cfg)


def test_missing_value_is_named() -> None:
    cfg = compose_train("optimizer.lr=???")
    with pytest.raises(ConfigError, match=r"optimizer\.lr"):
        validate_config(cfg)


@pytest.mark.parametrize(
    "monitor", ["val/err1", "train/loss_step", "step", "perf/train_images_per_s", "mine/score"]
)
def test_monitors_that_may_be_logged_pass(monitor: str) -> None:
    """Only names in our own families (train/, val/, test/) or without one must be known now;
    a callback's own family (Throughput's perf/, a user's) is logged under names found later."""
    validate_config(compose_train(f"callbacks.model_checkpoint.monitor={monitor}"))


def test_paper_milestones() -> None:
    assert epoch_milestones(300, [0.5, 0.75]) == [149, 224]
