"""lightning-hydra-template habits (issues 12 §3, 21): single-callback configs that compose with
the defaults (model_summary too), TensorBoard/MLflow/many loggers read back with their own
readers, the template's remaining logger and trainer names, the `ddp_sim` trainer alias, the
`fdr`, `limit`, `profiler` debug configs, the machine-local `local` group and `recipe=` from the
command line."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, compose_train, train_here
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    TQDMProgressBar,
)
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.profilers import SimpleProfiler

from gunn_exp.config import validate_config
from gunn_exp.training.schedules import register_resolvers

register_resolvers()


def callbacks_of(cfg: DictConfig) -> list[object]:
    return [instantiate(conf) for conf in (cfg.callbacks or {}).values() if "_target_" in conf]


def type_names(objects: list[object]) -> list[str]:
    return sorted(type(o).__name__ for o in objects)


DEFAULT = type_names(callbacks_of(compose_train()))
TQDM_FREE = [name for name in DEFAULT if name != "TQDMProgressBar"]  # where rich replaces it
assert len(TQDM_FREE) == len(DEFAULT) - 1


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("early_stopping", ["EarlyStopping"]),
        ("model_checkpoint", ["ModelCheckpoint"]),
        ("rich_progress_bar", ["RichProgressBar"]),
        ("model_summary", ["RichModelSummary"]),
        ("[default,early_stopping]", sorted([*DEFAULT, "EarlyStopping"])),
        ("[default,model_summary]", sorted([*DEFAULT, "RichModelSummary"])),
        ("[default,model_checkpoint]", DEFAULT),
        # one progress bar per Trainer: rich's replaces tqdm's
        ("[default,rich_progress_bar]", sorted(["RichProgressBar", *TQDM_FREE])),
    ],
)
def test_single_callbacks_compose_with_the_defaults(choice: str, expected: list[str]) -> None:
    callbacks = callbacks_of(compose_train(f"callbacks={choice}"))
    assert type_names(callbacks) == expected
    Trainer(callbacks=callbacks, logger=False, accelerator="cpu")  # Lightning accepts the set


def test_default_callbacks_keep_best_checkpoint_by_val_error() -> None:
    cfg = compose_train()
    callbacks = callbacks_of(cfg)
    best = [c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor]
    assert cfg.optimized_metric == "val/err1_best"  # the module's running minimum of val/err1
    assert len(best) == 1 and (best[0].monitor, best[0].mode, best[0].filename) == (
        cfg.optimized_metric,
        "min",
        "best",
    )
    assert any(isinstance(c, TQDMProgressBar) for c in callbacks)
    (stop,) = callbacks_of(compose_train("callbacks=early_stopping"))
    assert isinstance(stop, EarlyStopping) and (stop.monitor, stop.mode) == ("val/err1", "min")


def test_ddp_sim_is_ddp_cpu() -> None:
    assert compose_train("trainer=ddp_sim").trainer == compose_train("trainer=ddp_cpu").trainer


def test_debug_configs() -> None:
    fdr, fast = compose_train("debug=fdr"), compose_train("debug=fast_dev_run")
    assert fdr == fast and fdr.trainer.fast_dev_run is True and not fdr.logger
    limit = compose_train("experiment=digits", "debug=limit")
    validate_config(limit)
    assert 0 < limit.trainer.limit_train_batches < 1 and limit.trainer.max_epochs == 3
    profiler = instantiate(compose_train("debug=profiler").trainer.profiler)
    assert isinstance(profiler, SimpleProfiler)
    default = compose_train("experiment=digits", "debug=default")
    validate_config(default)
    assert default.trainer.detect_anomaly is True and default.trainer.max_epochs == 1
    assert default.extras.enforce_tags is False and default.data.num_workers == 0


@pytest.mark.parametrize("uri", ["http://tracking.example:5000", "sqlite:///{tmp}/mlflow.db"])
def test_mlflow_tracking_uri_is_a_setting(uri: str, tmp_path: Path) -> None:
    uri = uri.format(tmp=tmp_path)
    cfg = compose_train("logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    logger = instantiate(cfg.logger.mlflow)  # a server is contacted at the first write only
    assert isinstance(logger, MLFlowLogger) and logger._tracking_uri == uri


def test_many_loggers_are_read_back_by_their_libraries(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    logs, run_dir = tmp_path / "logs", tmp_path / "run"
    train_here(run_dir, "experiment=digits", "debug=tiny", "logger=many", f"paths.log_dir={logs}",
               "+trainer.log_every_n_steps=2")  # fmt: skip
    epochs = json.loads((run_dir / "results.json").read_text())["epochs"]
    assert epochs == 2 and len((run_dir / "metrics.csv").read_text().splitlines()) == 1 + epochs
    assert not (run_dir / "csv").exists()  # logger=csv is metrics.csv: no second, step-level CSV

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert len(events.Scalars("val/err1")) == epochs and len(events.Scalars("train/loss")) == epochs
    # What wandb's dashboard has, where it applies: step curves, images/s, the test confusion.
    steps = 3 * epochs // 2  # debug=tiny: 3 batches an epoch, logged every log_every_n_steps=2
    assert len(events.Scalars("train/loss_step")) == len(events.Scalars("lr_step")) == steps
    assert len(events.Scalars("perf/train_images_per_s")) == epochs
    assert len(events.Scalars("perf/val_images_per_s")) == epochs
    assert len(events.Scalars("perf/test_images_per_s")) == 1
    assert sorted(events.Tags()["images"]) == ["curves", "test/confusion_matrix"]
    (start,) = [
        HParamsPluginData.FromString(content).session_start_info
        for content in events.PluginTagToContent("hparams").values()
        if HParamsPluginData.FromString(content).HasField("session_start_info")
    ]
    assert start.hparams["model/name"].string_value == "gunn_mini"
    assert start.hparams["params"].number_value > 0

    client = MlflowClient(f"sqlite:///{logs}/mlflow/mlflow.db")
    (experiment,) = [e for e in client.search_experiments() if e.name == "debug"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["model/name"] == "gunn_mini" and run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "val/err1")) == epochs
    artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert artifacts == ["curves.png", "test_confusion_matrix.png"]
    assert len(client.get_metric_history(run.info.run_id, "perf/train_images_per_s")) == epochs
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) == steps
    assert (logs / "mlflow" / "mlruns").is_dir()  # artifacts beside the store, not in the cwd


def test_profiler_run_with_composed_callbacks(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_here(
        run_dir,
        "experiment=digits",
        "debug=profiler",
        "callbacks=[default,early_stopping,rich_progress_bar]",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
    )
    report = (run_dir / "fit-profiler.txt").read_text()
    assert "run_training_batch" in report and "Total" in report
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 1


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("tensorboard", ["TensorBoardLogger"]),
        ("mlflow", ["MLFlowLogger"]),
        ("csv", []),  # metrics.csv is always written; no second CSV logger
        ("many", ["MLFlowLogger", "TensorBoardLogger"]),
        ("[many,wandb]", ["MLFlowLogger", "TensorBoardLogger", "WandbLogger"]),
        ("[csv,tensorboard]", ["TensorBoardLogger"]),
    ],
)
def test_logger_configs_compose(choice: str, expected: list[str], tmp_path: Path) -> None:
    cfg = compose_train(f"logger={choice}", f"paths.log_dir={tmp_path}")  # MLflow's store
    loggers = cfg.logger or {}  # logger=csv composes to no logger at all
    assert type_names([instantiate(conf) for conf in loggers.values()]) == expected


@pytest.mark.parametrize(
    ("logger", "target"),
    [
        ("comet", "pytorch_lightning.loggers.CometLogger"),
        ("neptune", "pytorch_lightning.loggers.neptune.NeptuneLogger"),
        ("aim", "aim.pytorch_lightning.AimLogger"),
    ],
)
def test_template_logger_names_compose(logger: str, target: str) -> None:
    """The template's other loggers: their packages are extras (test_bad_input: refused in one
    line when missing); Lightning's classes accept the configs' keys."""
    (conf,) = compose_train(f"logger={logger}").logger.values()
    assert conf._target_ == target
    if target.startswith("pytorch_lightning"):
        keys = {k: v for k, v in conf.items() if k != "_target_"}
        inspect.signature(get_class(target)).bind(**keys)


def test_many_loggers_is_the_templates_name_for_many() -> None:
    assert compose_train("logger=many_loggers").logger == compose_train("logger=many").logger


def test_trainer_mps_is_the_templates() -> None:
    trainer = compose_train("trainer=mps").trainer
    assert (trainer.accelerator, trainer.devices) == ("mps", 1)


def test_optional_local_config_is_merged_when_present(tmp_path: Path) -> None:
    """`optional local: default` (the template's): conf/local/default.yaml, git-ignored, holds
    this machine's settings; without it the config composes as before."""
    conf = shutil.copytree(ROOT / "conf", tmp_path / "conf")
    assert (ROOT / "conf" / "local").is_dir() and "/conf/local/default.yaml" in (
        ROOT / ".gitignore"
    ).read_text().splitlines()

    def data_dir() -> str:
        with initialize_config_dir(str(conf), version_base="1.3"):
            cfg = compose("train", overrides=["data=cifar10"], return_hydra_config=True)
        return cfg.data.data_dir

    before = data_dir()
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /scratch\n"
    )
    assert before != "/scratch" and data_dir() == "/scratch"


@pytest.mark.parametrize(
    ("recipe", "epochs", "batch", "schedule", "paper_row"),
    [
        ("cifar", 300, 64, "MultiStepLR", ("gunn15", "cifar10")),
        ("imagenet", 120, 256, "LambdaLR", ("gunn18", "imagenet")),
    ],
)
def test_recipe_from_the_command_line_on_any_model_and_data(
    recipe: str, epochs: int, batch: int, schedule: str, paper_row: tuple[str, str]
) -> None:
    cfg = compose_train(f"recipe={recipe}", "model=gunn_mini", "data=digits")
    validate_config(cfg)
    assert (cfg.model.name, cfg.data.name) == ("gunn_mini", "digits")
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.trainer.precision) == (
        epochs,
        batch,
        "32-true",
    )
    assert cfg.scheduler._target_.endswith(schedule) and cfg.optimizer.nesterov is True
    instantiate(cfg.data)  # the recipe sets no key the digits data module lacks
    # A paper experiment is its recipe on its model and data.
    model, data = paper_row
    experiment = compose_train(f"experiment={model}_{data}")
    by_hand = compose_train(f"recipe={recipe}", f"model={model}", f"data={data}")
    for group in ("model", "data", "optimizer", "scheduler", "trainer"):
        assert experiment[group] == by_hand[group], group
