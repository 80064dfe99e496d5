"""The wandb dashboard of a run (issue 22), read back from an offline run's `.wandb` records:
step-level curves, epoch x-axes, min-summaries, speed per epoch, the test confusion matrix and
misclassified images, checkpoint artifacts; the same run with wandb disabled; the throughput
arithmetic on a controlled clock."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import RUN_ENV, compose_train, quiet_trainer, shared_run, train_here
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_records import OfflineRun, read_offline_run

from gunn_exp import rundir
from gunn_exp.task import ClassificationModule
from gunn_exp.training import throughput
from gunn_exp.training.mistakes import to_pixels
from gunn_exp.training.throughput import Throughput
from gunn_exp.training.wandb_logger import WandbLogger

LOG_EVERY = 2  # trainer.log_every_n_steps of the run below
# debug=tiny on digits with 8 training batches (enough for the validation error to move)
STEPS_PER_EPOCH, EPOCHS, BATCH, TEST_BATCHES = 8, 2, 64, 2


@pytest.fixture(scope="session")
def wandb_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OfflineRun]:
    """`train.py experiment=digits debug=tiny logger=wandb logger.wandb.log_model=true` offline,
    with the singularity diagnostics on; its run directory and its wandb records."""
    data = tmp_path_factory.getbasetemp() / "wandb-data"  # wandb's staging copies, not in ~
    env = {**RUN_ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DATA_DIR": str(data), "WANDB_CACHE_DIR": str(data)}  # fmt: skip
    _, run_dir = shared_run(
        tmp_path_factory, "wandb_run", "experiment=digits", "debug=tiny", "logger=wandb",
        "logger.wandb.log_model=true", f"+trainer.log_every_n_steps={LOG_EVERY}",
        f"trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "callbacks=[default,singularity]", env=env,
    )  # fmt: skip
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_dir, read_offline_run(run_file)


def results(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / rundir.RESULTS).read_text())


def rows_with(run: OfflineRun, key: str) -> list[dict[str, Any]]:
    return [row for row in run.history if key in row]


def test_step_level_loss_and_lr_every_log_every_n_steps(wandb_run) -> None:
    run_dir, run = wandb_run
    steps = rows_with(run, "train/loss_step")
    assert len(steps) == EPOCHS * STEPS_PER_EPOCH // LOG_EVERY
    assert all(np.isfinite(row["train/loss_step"]) and "lr_step" in row for row in steps)
    # The lr in effect at that step: the cosine schedule's value of the row's epoch.
    lr = {int(r["epoch"]) - 1: r["lr"] for r in rundir.read_metrics(run_dir / rundir.METRICS)}
    assert [row["lr_step"] for row in steps] == pytest.approx([lr[row["epoch"]] for row in steps])
    assert len({row["lr_step"] for row in steps}) == EPOCHS  # it changes between the epochs
    # The per-epoch means stay, one row per epoch.
    assert len(rows_with(run, "train/loss")) == EPOCHS and len(rows_with(run, "lr")) == EPOCHS


def test_per_epoch_panels_use_epoch_and_summaries_sort_by_the_best(wandb_run) -> None:
    run_dir, run = wandb_run
    per_epoch = ["train/loss", "train/err1", "val/err1", "val/err1_best", "lr",
                 "perf/train_images_per_s", "perf/val_images_per_s", "test/err1",
                 "singularity/stages.0.gunn1/inc_corr_mean",
                 "singularity/probe_time_s"]  # fmt: skip
    for key in per_epoch:
        assert run.metrics[key]["stepMetric"] == "epoch", key
    # Step-level keys keep Lightning's catch-all x-axis, the global step.
    assert "train/loss_step" not in run.metrics and "lr_step" not in run.metrics
    assert run.metrics["*"]["stepMetric"] == "trainer/global_step"
    assert run.metrics["val/err1"]["summary"] == {"min": True}
    assert run.metrics["test/err1"]["summary"] == {"last": True}
    saved = results(run_dir)
    val_err1 = [row["val/err1"] for row in rows_with(run, "val/err1")]
    assert len(val_err1) == EPOCHS
    assert run.summary["val/err1"] == {"min": min(val_err1)} == {"min": saved["best_val_err1"]}
    assert run.summary["test/err1"] == {"last": saved["test_err1"]}


def test_images_per_second_every_epoch(wandb_run) -> None:
    run_dir, run = wandb_run
    epochs = rundir.read_metrics(run_dir / rundir.METRICS)
    rows = {int(r["epoch"]): r for r in rows_with(run, "perf/train_images_per_s")}
    val = {int(r["epoch"]): r for r in rows_with(run, "perf/val_images_per_s")}
    assert sorted(rows) == sorted(val) == list(range(EPOCHS))
    for epoch in epochs:
        seconds = epoch["epoch_time_s"]  # training and validation together: a lower bound
        assert (
            rows[epoch["epoch"] - 1]["perf/train_images_per_s"] >= STEPS_PER_EPOCH * BATCH / seconds
        )
        assert val[epoch["epoch"] - 1]["perf/val_images_per_s"] >= 2 * BATCH / seconds  # 2 batches
    (test,) = rows_with(run, "perf/test_images_per_s")
    assert test["perf/test_images_per_s"] > 0
    assert not rows_with(run, "perf/peak_memory_gib")  # a CPU run: no accelerator memory


def test_confusion_matrix_and_misclassified_images(wandb_run) -> None:
    run_dir, run = wandb_run
    files = next(run_dir.glob("wandb/offline-run-*/files"))
    panel = run.config["_wandb/visualize/test/confusion_matrix"]
    assert panel["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"
    (table,) = files.glob("media/table/test/confusion_matrix_table_*.table.json")
    cells = json.loads(table.read_text())["data"]  # [true, predicted, count]
    assert len(cells) == 10 * 10
    total = sum(count for _, _, count in cells)
    wrong = sum(count for true, predicted, count in cells if true != predicted)
    saved = results(run_dir)
    assert total == TEST_BATCHES * BATCH
    assert 100 * wrong / total == pytest.approx(saved["test_err1"])
    # Rows are the true classes: they count the labels of the tested images.
    data = instantiate(compose_train("experiment=digits").data)
    data.setup("test")
    batches = itertools.islice(data.test_dataloader(), TEST_BATCHES)
    labels = torch.cat([y for _, y in batches])
    per_true = [sum(c for true, _, c in cells if true == str(k)) for k in range(10)]
    assert per_true == torch.bincount(labels, minlength=10).tolist()

    (mistakes,) = files.glob("media/table/test/misclassified_*.table.json")
    mistakes = json.loads(mistakes.read_text())
    assert mistakes["columns"] == ["image", "true", "predicted", "confidence"]
    assert len(mistakes["data"]) == min(32, wrong)
    assert all(true != predicted for _, true, predicted, _ in mistakes["data"])
    assert all(0.1 <= confidence <= 1 for *_, confidence in mistakes["data"])  # 10 classes
    (images,) = [a for a in run.artifacts if "misclassified" in a["name"]]
    assert sum(f.endswith(".png") for f in images["files"]) == len(mistakes["data"])


def test_checkpoints_are_artifacts_with_aliases_and_metadata(wandb_run) -> None:
    run_dir, run = wandb_run
    saved = results(run_dir)
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert {a["name"] for a in models} == {f"model-{run.run_id}"}
    by_alias = {alias: a for a in models for alias in a["aliases"] if alias in ("best", "last")}
    assert sorted(by_alias) == ["best", "last"] and len(models) == 2
    best, last = by_alias["best"], by_alias["last"]
    assert best["files"] == last["files"] == ["model.ckpt"]
    assert best["metadata"]["epoch"] == saved["best_val_epoch"]
    assert best["metadata"]["val_err1"] == saved["best_val_err1"]
    assert best["metadata"]["original_filename"] == "best.ckpt"
    assert last["metadata"]["epoch"] == EPOCHS
    assert last["metadata"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert last["metadata"]["val_err1"] == saved["final_val_err1"]
    first_val_err1 = rows_with(run, "val/err1")[0]["val/err1"]
    assert first_val_err1 != saved["final_val_err1"]  # so a stale val_err1 would show
    assert last["metadata"]["original_filename"] == "last.ckpt"
    assert {a["metadata"]["model"] for a in models} == {"gunn_mini"}
    assert {a["metadata"]["data"] for a in models} == {"digits"}


def test_a_run_with_wandb_disabled_trains_and_tests(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run_dir = tmp_path / "run"
    saved = train_here(run_dir, "experiment=digits", "debug=tiny", "logger=wandb",
                       "logger.wandb.log_model=true")  # fmt: skip
    assert saved["test_err1"] is not None and saved["epochs"] == EPOCHS
    assert saved["metrics"]["perf/train_images_per_s"] > 0
    assert not list(run_dir.glob("wandb/offline-run-*"))  # nothing written for wandb


# --- the arithmetic, in-process ---------------------------------------------------------------


class Clock:
    """time.perf_counter for throughput.py: advanced by the steps below, never by real time."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedSteps(pl.LightningModule):
    """Each training batch takes 2 s of the clock, each validation batch 0.5 s, the end of a
    validation 1 s."""

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock, self.layer = clock, nn.Linear(4, 2)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.clock.now += 2.0
        return self.layer(batch[0]).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.clock.now += 0.5

    def on_validation_epoch_end(self) -> None:
        self.clock.now += 1.0  # the epoch's metrics: evaluation time too

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SlowEpochEnd(pl.Callback):
    """Another callback's end-of-epoch work (a plot, say): 100 s of the clock, before Throughput."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.now += 100.0


def test_throughput_counts_images_over_their_loops_time_only(monkeypatch) -> None:
    clock = Clock()
    monkeypatch.setattr(throughput.time, "perf_counter", clock)
    data = TensorDataset(torch.randn(40, 4), torch.zeros(40, dtype=torch.long))
    trainer = quiet_trainer(max_epochs=1, callbacks=[SlowEpochEnd(clock), Throughput()],
                            num_sanity_val_steps=0, enable_checkpointing=False,
                            val_check_interval=0.5)  # fmt: skip
    # 4 training batches of 10 (8 s); a validation after the 2nd and after the 4th, each of 4
    # batches of 10 and its end (3 s): the one inside the epoch is not training time.
    trainer.fit(TimedSteps(clock), DataLoader(data, batch_size=10), DataLoader(data, batch_size=10))
    metrics = trainer.callback_metrics
    assert float(metrics["perf/train_images_per_s"]) == pytest.approx(40 / 8.0)
    assert float(metrics["perf/val_images_per_s"]) == pytest.approx(80 / 6.0)


def test_the_confusion_matrix_counts_one_test_only() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    model.num_classes = 3
    module = ClassificationModule(model)
    data = TensorDataset(torch.randn(12, 4), torch.randint(0, 3, (12,)))
    trainer = quiet_trainer()
    for _ in range(2):  # e.g. a second trainer.test of the same module
        trainer.test(module, DataLoader(data, batch_size=5), verbose=False)
        assert int(module.confusion.compute().sum()) == len(data)


def test_wandb_logger_keeps_checkpoints_offline_too() -> None:
    # Lightning's own refuses log_model with offline=True; a wandb run is started only on use.
    logger = WandbLogger(offline=True, log_model=True, save_dir="unused")
    assert logger.checkpoint_artifacts is True


def test_misclassified_images_are_shown_as_the_model_saw_them() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    image = torch.from_numpy(pixels).permute(2, 0, 1) / 255 - torch.tensor(mean)[:, None, None]
    image = image / torch.tensor(std)[:, None, None]
    assert np.array_equal(to_pixels(image, mean, std), pixels)
    grey = to_pixels(image[:1], mean, std)
    assert grey.shape == (8, 8) and np.array_equal(grey, pixels[..., 0])
