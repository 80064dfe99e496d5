"""A run's records stay true: DDP with wandb, strategies that would lose results, resumes with
another config, two runs in one directory, a full disk, a diverging loss (issue 12, section 1)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, RUN_ENV, compose_train, exit_status, quiet_trainer, train_here
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from wandb_records import read_offline_run

from gunn_exp import rundir
from gunn_exp.errors import ConfigError, DiskFull, NonFiniteLoss, RunError
from gunn_exp.rundir.checkpoint import load_checkpoint
from gunn_exp.rundir.configs import config_history, latest_config, save_config
from gunn_exp.rundir.lock import RunLock
from gunn_exp.training.checkpoints import AtomicCheckpointIO
from gunn_exp.training.faults import FiniteLossGuard
from gunn_exp.training.launch import refuse_child_process_ranks
from gunn_exp.training.resume import check_config_change
from gunn_exp.training.schedules import register_resolvers

register_resolvers()

TINY = ("experiment=digits", "debug=tiny", "print_config=false")


def error_lines(stderr: str, prefix: str = "error:") -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(prefix)]


# --- DDP + wandb --------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_run_with_wandb_offline_records_config_metrics_and_curves(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *TINY,
            "trainer=ddp_cpu",
            "logger=wandb",
            "logger.wandb.log_model=true",
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=1",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env={
            **RUN_ENV,
            "WANDB_MODE": "offline",
            "WANDB_SILENT": "true",
            "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),  # staged artifacts, not in ~
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # one wandb run, from rank 0
    run = read_offline_run(run_file)
    assert run.run_id == (run_dir / rundir.WANDB_ID).read_text().strip()
    assert run.config["model/name"] == "gunn_mini" and run.config["trainer/devices"] == 2
    assert run.summary["params"] == json.loads((run_dir / "results.json").read_text())["params"]
    epochs = sorted({row["epoch"] for row in run.history if "val/err1" in row})
    assert epochs == [0, 1]  # Lightning's 0-based epochs: one validation row per epoch
    assert sum("train/loss" in row for row in run.history) == 2
    (curves,) = [row for row in run.history if "curves/filenames" in row]
    image = run_file.parent / "files" / curves["curves/filenames"][0]
    assert image.is_file() and image.read_bytes()[:4] == b"\x89PNG"
    # The dashboard from rank 0: its step curve (3 steps an epoch), images/s summed over both
    # ranks, the confusion matrix of both ranks' test images, the checkpoints once.
    assert sum("train/loss_step" in row for row in run.history) == 6
    rates = [
        row["perf/train_images_per_s"] for row in run.history if "perf/train_images_per_s" in row
    ]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
    (table,) = run_file.parent.glob("files/media/table/test/confusion_matrix_table_*.table.json")
    assert sum(count for *_, count in json.loads(table.read_text())["data"]) == 2 * 64
    models = [a for a in run.artifacts if a["type"] == "model"]
    assert sorted(alias for a in models for alias in a["aliases"] if alias != "latest") == [
        "best",
        "last",
    ]


# --- strategies that train in child processes ---------------------------------------------------


def test_ddp_spawn_is_refused_before_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code, stderr = exit_status(
        lambda: train_here(run_dir, *TINY, "trainer=ddp_cpu", "trainer.strategy=ddp_spawn")
    )
    assert code == 2
    (line,) = error_lines(stderr)
    assert "trainer.strategy=ddp_spawn" in line and "trainer.strategy=ddp" in line
    assert "Traceback" not in stderr
    assert not (run_dir / "results.json").exists() and not (run_dir / "metrics.csv").exists()


@pytest.mark.parametrize(
    "strategy",
    ["ddp_fork", "ddp_notebook", "ddp_spawn_find_unused_parameters_true", "{start_method: spawn}"],
)
def test_every_child_process_strategy_is_refused(strategy: str) -> None:
    cfg = compose_train("experiment=digits", f"+trainer.strategy={strategy}")
    with pytest.raises(ConfigError, match="trainer.strategy="):
        refuse_child_process_ranks(cfg)
    refuse_child_process_ranks(compose_train("experiment=digits", "trainer=ddp_cpu"))


# --- resuming with another config ---------------------------------------------------------------


def write_run_config(run_dir: Path, *overrides: str) -> Path:
    cfg = compose_train(*overrides)
    save_config(cfg, run_dir)
    return rundir.checkpoint_path(run_dir, rundir.LAST)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("model=sunn_mini",), "model.name: run 'gunn_mini', now 'sunn_mini'"),
        (("model.update=simultaneous",), "model.update: run 'gradual', now 'simultaneous'"),
        (("model.drop_rate=0.2",), "model.drop_rate: run 0.0, now 0.2"),
        (("data.batch_size=32",), "data.batch_size: run 64, now 32"),
        (("optimizer.lr=0.05",), "optimizer.lr: run 0.1, now 0.05"),
        (("scheduler=multistep",), "scheduler._target_"),
        (("trainer.max_epochs=30",), "trainer.max_epochs: run 15, now 30"),
        (("seed=1",), "seed: run 0, now 1"),
    ],
)
def test_resume_with_a_training_change_is_refused_naming_both_values(
    tmp_path: Path, change: tuple[str, ...], named: str
) -> None:
    ckpt = write_run_config(tmp_path, "experiment=digits")
    new = compose_train("experiment=digits", *change)
    with pytest.raises(ConfigError, match="allow_config_change=true") as err:
        check_config_change(new, {}, ckpt, tmp_path)
    assert named in str(err.value) and "\n" not in str(err.value)
    allowed = compose_train("experiment=digits", *change, "allow_config_change=true")
    assert check_config_change(allowed, {}, ckpt, tmp_path) is True


@pytest.mark.parametrize(
    "change", ["data.num_workers=2", "model.impl=reference", "trainer.devices=1", "logger=none"]
)
def test_resume_may_change_what_does_not_change_training(tmp_path: Path, change: str) -> None:
    ckpt = write_run_config(tmp_path, "experiment=digits")
    assert (
        check_config_change(compose_train("experiment=digits", change), {}, ckpt, tmp_path) is False
    )


def test_config_history_never_overwrites_the_first(tmp_path: Path) -> None:
    first = compose_train("experiment=digits")
    save_config(first, tmp_path)
    original = (tmp_path / "config.yaml").read_text()
    save_config(first, tmp_path, resuming=True)  # same config: nothing new
    assert config_history(tmp_path) == [tmp_path / "config.yaml"]
    longer = compose_train("experiment=digits", "trainer.max_epochs=30")
    save_config(longer, tmp_path, resuming=True)
    assert (tmp_path / "config.yaml").read_text() == original
    assert latest_config(tmp_path) == tmp_path / "config.resume-1.yaml"
    assert OmegaConf.load(latest_config(tmp_path)).trainer.max_epochs == 30


def test_resume_as_another_model_is_refused_and_keeps_the_record(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_here(run_dir, *TINY, "trainer.max_epochs=1")
    config = (run_dir / "config.yaml").read_text()
    code, stderr = exit_status(
        lambda: train_here(
            run_dir, *TINY, "trainer.max_epochs=1", "model=sunn_mini", "ckpt_path=last"
        )
    )
    assert code == 2, stderr[-2000:]
    (line,) = error_lines(stderr)
    assert "'gunn_mini'" in line and "'sunn_mini'" in line and "allow_config_change" in line
    assert (run_dir / "config.yaml").read_text() == config
    assert config_history(run_dir) == [run_dir / "config.yaml"]


@pytest.mark.slow
def test_extending_a_run_on_purpose_follows_the_new_schedule(run_train) -> None:
    """2 cosine epochs extended to 4: lr 0.1, 0.05, then epochs 3-4 of a 4-epoch cosine."""
    _, run_dir = run_train(*TINY, "trainer.max_epochs=2")
    refused, _ = run_train(*TINY, "trainer.max_epochs=4", "ckpt_path=last", check=False)
    assert refused.returncode == 2 and "trainer.max_epochs: run 2, now 4" in refused.stderr
    run_train(*TINY, "trainer.max_epochs=4", "ckpt_path=last", "allow_config_change=true")
    lrs = [row["lr"] for row in rundir.read_metrics(run_dir / "metrics.csv")]
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.0146447], rel=1e-5)
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_epochs == 2
    assert OmegaConf.load(run_dir / "config.resume-1.yaml").trainer.max_epochs == 4


# --- one run per run directory ------------------------------------------------------------------


@pytest.fixture
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def hold_lock(run_dir: Path, pid: int, host: str | None = None, job: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / rundir.LOCK
    lock.write_text(f"{pid} {host or socket.gethostname()} {job}\n")
    return lock


def test_second_run_into_a_locked_run_directory_is_refused(tmp_path: Path,
                                                          live_process: int) -> None:  # fmt: skip
    run_dir = tmp_path / "run"
    lock = hold_lock(run_dir, live_process)  # a process that is not this one's parent
    code, stderr = exit_status(lambda: train_here(run_dir, *TINY))
    assert code == 2
    (line,) = error_lines(stderr)
    assert f"in use by process {live_process}" in line and str(lock) in line
    assert not (run_dir / "config.yaml").exists() and lock.read_text().split()[0] == str(
        live_process
    )


def test_run_lock_is_released_taken_over_when_stale_and_shared_with_children(
    tmp_path: Path, live_process: int
) -> None:
    with RunLock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text().split()[0] == str(os.getpid())
        with pytest.raises(RunError, match="in use by process"):
            hold_lock(tmp_path / "other", live_process)
            RunLock(tmp_path / "other").__enter__()
        # A child (a DDP rank, a multirun job's single run) shares its parent's lock.
        child = subprocess.run(
            [sys.executable, "-c", f"from gunn_exp.rundir.lock import RunLock\n"
             f"with RunLock({str(tmp_path)!r}): pass"],
            env=RUN_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert child.returncode == 0, child.stderr
        assert (tmp_path / rundir.LOCK).is_file()
    assert not (tmp_path / rundir.LOCK).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    hold_lock(tmp_path, int(dead))  # a killed run's lock
    with RunLock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text().split()[0] == str(os.getpid())
    hold_lock(tmp_path, live_process, host="another-host")  # cannot tell: refuse
    with pytest.raises(RunError, match="another-host"):
        RunLock(tmp_path).__enter__()


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path, monkeypatch) -> None:
    # Killed hard on one node, requeued (same job id) on another.
    hold_lock(tmp_path, 4242, host="node-a", job="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(RunError, match="node-a"):
        RunLock(tmp_path).__enter__()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    with RunLock(tmp_path):
        assert (tmp_path / rundir.LOCK).read_text().split() == [
            str(os.getpid()),
            socket.gethostname(),
            "777",
        ]
    assert not (tmp_path / rundir.LOCK).exists()


# --- a full disk --------------------------------------------------------------------------------


def test_disk_full_during_a_save_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "version": 1}, path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(DiskFull, match=f"disk full while writing {path}"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "version": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    # torch.save reports a failed write as a RuntimeError raised while handling the OSError.
    with pytest.raises(DiskFull):
        rundir.atomic_write(tmp_path / "m.csv", _raise_from_enospc)
    assert not (tmp_path / "m.csv").exists()


def _raise_from_enospc(f: object) -> None:
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None


def test_full_disk_stops_the_run_in_one_line_naming_the_intact_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save fails for lack of space from the second epoch's checkpoints on.
    real_save = torch.save

    def save(obj: object, f: object, *args: object, **kwargs: object) -> None:
        if isinstance(obj, dict) and obj.get("epoch", 0) >= 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    code, stderr = exit_status(lambda: train_here(run_dir, *TINY, "trainer.max_epochs=3"))
    monkeypatch.undo()
    assert code == 1, stderr[-3000:]
    (line,) = error_lines(stderr, "stopped:")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert line.startswith(f"stopped: disk full while writing {run_dir / 'checkpoints'}")
    assert f"{last} is intact (saved in epoch 1, step 3)" in line and "ckpt_path=last" in line
    assert "Traceback" not in stderr
    assert load_checkpoint(last)["epoch"] == 0
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


# --- a diverging loss ---------------------------------------------------------------------------


class Linear(pl.LightningModule):
    """A linear regression whose loss is scaled by `blowup` from step `at` on."""

    def __init__(self, at: int | None = None, blowup: float = 1.0) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.at, self.blowup = at, blowup

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):  # noqa: ANN201
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        return loss * self.blowup if self.at is not None and self.global_step >= self.at else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(module: pl.LightningModule, root: Path, *callbacks: pl.Callback, epochs: int = 3) -> None:
    data = DataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=4)
    last = pl.callbacks.ModelCheckpoint(dirpath=root / "checkpoints", filename="last")
    trainer = quiet_trainer(max_epochs=epochs, default_root_dir=root, callbacks=[last, *callbacks])
    trainer.fit(module, data)


def test_diverging_loss_stops_before_the_step_and_names_the_checkpoint_epoch(
    tmp_path: Path,
) -> None:
    module = Linear(at=15, blowup=1e6)  # epoch 2 (10 steps per epoch), finite but exploded
    guard = FiniteLossGuard(str(tmp_path / "checkpoints"))
    with pytest.raises(NonFiniteLoss, match="diverging training loss") as err:
        fit(module, tmp_path, guard)
    assert "epoch 2, step 15" in str(err.value) and "(saved in epoch 1, step 10)" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0
    assert len(ckpt["callbacks"]["FiniteLossGuard"]["first_losses"]) == 10  # kept for a resume


def test_checkpoint_with_non_finite_weights_is_never_written(tmp_path: Path) -> None:
    class PoisonAtEpoch2(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.layer.weight.fill_(float("inf"))

    # Registered before the checkpoint callback: it poisons the weights before the save.
    guard = FiniteLossGuard(str(tmp_path / "checkpoints"))
    module = Linear()
    data = DataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=4)
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="last")
    trainer = quiet_trainer(
        max_epochs=3, default_root_dir=tmp_path, callbacks=[PoisonAtEpoch2(), guard, last]
    )
    with pytest.raises(NonFiniteLoss, match="non-finite weights .*layer.weight.* epoch 2"):
        trainer.fit(module, data)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] == 0 and torch.isfinite(ckpt["state_dict"]["layer.weight"]).all()
