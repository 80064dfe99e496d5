"""lightning-hydra-template habits (issue 12 §3): single-callback configs that compose with the
defaults, TensorBoard/MLflow/many loggers read back with their own readers, the `ddp_sim` trainer
alias and the `fdr`, `limit`, `profiler` debug configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import compose_train, train_here
from hydra.utils import instantiate
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
from gunn_exp.training.callbacks import EpochSummary
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
        ("[default,early_stopping]", sorted([*DEFAULT, "EarlyStopping"])),
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
    assert any(isinstance(c, EpochSummary) for c in callbacks)
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
               "trainer.log_every_n_steps=2")  # fmt: skip
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
