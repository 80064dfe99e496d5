"""A run's records stay true: DDP with wandb, strategies that would lose results, resumes with
another config, two runs in one directory, a full disk, a diverging loss (issue 12, section 1)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import (
    ROOT,
    RUN_ENV,
    compose_train,
    copy_run,
    exit_status,
    fill,
    quiet_trainer,
    run_entry,
    tmpfs,
    train_here,
)
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
from gunn_exp.training.launch import with_script_ranks
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
            "+trainer.log_every_n_steps=1",
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


@pytest.mark.parametrize(
    ("strategy", "becomes"),
    [
        ("ddp_spawn", "ddp"),
        ("ddp_fork", "ddp"),
        ("ddp_notebook", "ddp"),
        ("ddp_spawn_find_unused_parameters_true", "ddp_find_unused_parameters_true"),
        ("ddp", "ddp"),
        ("auto", "auto"),
    ],
)
def test_child_process_strategies_train_as_ddp(strategy: str, becomes: str) -> None:
    """Their ranks would keep the run's results (epochs, best epoch) in child processes."""
    cfg = compose_train("experiment=digits", f"++trainer.strategy={strategy}")
    assert with_script_ranks(cfg).trainer.strategy == becomes
    assert cfg.trainer.strategy == strategy  # the caller's config is not changed


def test_a_ddp_strategy_object_that_spawns_starts_its_ranks_as_scripts() -> None:
    strategy = "{_target_:pytorch_lightning.strategies.DDPStrategy,start_method:spawn}"
    cfg = compose_train("experiment=digits", f"++trainer.strategy={strategy}")
    assert with_script_ranks(cfg).trainer.strategy.start_method == "popen"


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
        (("seed=1",), "seed: run 0, now 1"),
        (("scheduler.T_max=30",), "scheduler.T_max: run 15, now 30"),  # the length stays 15
        (("trainer.max_epochs=30", "optimizer.lr=0.05"), "optimizer.lr: run 0.1, now 0.05"),
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
    ("scheduler", "line"),
    [
        ("cosine", "trainer.max_epochs 15 -> 30; CosineAnnealingLR lr over 15 -> 30 epochs"),
        (
            "multistep",
            "trainer.max_epochs 15 -> 30; MultiStepLR lr x0.1 from epochs [8, 12] -> [15, 23]",
        ),
        (
            "imagenet_step",
            "trainer.max_epochs 15 -> 30; the LambdaLR lr schedule does not depend on",
        ),
        ("none", "trainer.max_epochs 15 -> 30; constant lr"),
    ],
)
def test_resume_with_another_length_proceeds_with_one_line_on_the_schedule(
    tmp_path: Path, scheduler: str, line: str, caplog: pytest.LogCaptureFixture
) -> None:
    """lightning-hydra-template's resume test trains 1 epoch, then resumes with max_epochs=2."""
    ckpt = write_run_config(tmp_path, "experiment=digits", f"scheduler={scheduler}")
    longer = compose_train("experiment=digits", f"scheduler={scheduler}", "trainer.max_epochs=30")
    with caplog.at_level("WARNING", logger="gunn_exp"):
        assert check_config_change(longer, {}, ckpt, tmp_path) is True  # ResumedSchedule follows
    (warning,) = [r.getMessage() for r in caplog.records]
    assert line in warning and "\n" not in warning


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
def test_extending_a_run_follows_the_new_schedule(run_train) -> None:
    """2 cosine epochs extended to 4: lr 0.1, 0.05, then epochs 3-4 of a 4-epoch cosine."""
    _, run_dir = run_train(*TINY, "trainer.max_epochs=2")
    extended, _ = run_train(*TINY, "trainer.max_epochs=4", "ckpt_path=last")
    assert "trainer.max_epochs 2 -> 4; CosineAnnealingLR lr over 2 -> 4 epochs" in extended.stdout
    lrs = [row["lr"] for row in rundir.read_metrics(run_dir / "metrics.csv")]
    assert lrs == pytest.approx([0.1, 0.05, 0.05, 0.0146447], rel=1e-5)
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_epochs == 2
    assert OmegaConf.load(run_dir / "config.resume-1.yaml").trainer.max_epochs == 4


def files_of(run_dir: Path) -> dict[str, bytes]:
    """Every file under `run_dir` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_refused_resume_leaves_every_file_of_the_run_as_it_was(
    digits_run: tuple[str, Path], tmp_path: Path
) -> None:
    """Through train.py, so Hydra's own writes are in play: its record (.hydra/config.yaml,
    hydra.yaml, overrides.yaml) and its log file (debug.log) would describe a run that never
    happened."""
    run_dir = copy_run(digits_run[1], tmp_path / "run")
    before = files_of(run_dir)
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "debug.log"} <= set(
        before
    )  # the accepted run has Hydra's record and its log, written by train()
    proc = run_entry("train.py", *TINY, "model=sunn_mini", "ckpt_path=last",
                     f"hydra.run.dir={run_dir}", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = error_lines(proc.stderr)
    assert "'gunn_mini'" in line and "'sunn_mini'" in line
    assert files_of(run_dir) == before


def test_disk_full_before_the_run_starts_stops_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In this process: the first write of a run (its lock) fails for lack of space."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", no_space)
    run_dir = tmp_path / "run"
    code, stderr = exit_status(lambda: train_here(run_dir, *TINY))
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in stderr
    (line,) = error_lines(stderr, "stopped:")
    assert line.startswith(f"stopped: disk full while writing {run_dir / rundir.LOCK}")
    assert "no checkpoint was written yet" in line
    assert not run_dir.exists() or not list(run_dir.iterdir())  # no empty lock left behind


@pytest.mark.slow
def test_full_disk_at_the_start_or_resume_stops_in_one_line(
    digits_run: tuple[str, Path], tmp_path: Path
) -> None:
    """A real full disk (a small tmpfs), through train.py: a fresh run and a resume."""
    with tmpfs(tmp_path / "scratch", size="8m") as scratch:
        run_dir = copy_run(digits_run[1], scratch / "run")
        fill(scratch)
        before = files_of(run_dir)
        for target, overrides in ((scratch / "fresh", ()), (run_dir, ("ckpt_path=last",))):
            proc = run_entry("train.py", *TINY, *overrides, "trainer.max_epochs=3",
                             f"hydra.run.dir={target}", check=False)  # fmt: skip
            assert proc.returncode == 1, proc.stderr[-3000:]
            assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr
            (line,) = error_lines(proc.stderr, "stopped:")
            assert line.startswith(f"stopped: disk full while writing {target / rundir.LOCK}")
        assert "last.ckpt is intact (saved in epoch 2, step 6)" in line
        assert files_of(run_dir) == before


def test_run_killed_during_its_final_test_resumes_to_complete_results(tmp_path: Path) -> None:
    """Killed after its last epoch, during the test: resumed, it reports what an uninterrupted
    run does, though Lightning runs no epoch then (and logs nothing)."""
    run_dir = tmp_path / "run"
    uninterrupted = train_here(tmp_path / "uninterrupted", *TINY)
    train_here(run_dir, *TINY, "test=false")  # what a kill during the test leaves...
    (run_dir / rundir.RESULTS).unlink()  # ...no results.json
    resumed = train_here(run_dir, *TINY, "ckpt_path=last")
    for key in ("final_val_err1", "final_val_err5", "best_val_err1", "test_err1", "epochs"):
        assert resumed[key] is not None and resumed[key] == uninterrupted[key], key
    assert resumed["metrics"].keys() == uninterrupted["metrics"].keys()
    assert json.loads((run_dir / rundir.RESULTS).read_text())["final_val_err5"] is not None


def test_a_moved_run_resumes_as_it_would_have_in_place(tmp_path: Path) -> None:
    """scratch -> home: Lightning's ModelCheckpoint forgets its best when its dirpath changed."""
    scratch, home = tmp_path / "scratch", tmp_path / "home"
    train_here(scratch, *TINY, "+trainer.max_steps=3")  # stopped after epoch 1 of 2
    shutil.copytree(scratch, home)
    ends = {}
    for run_dir in (scratch, home):
        results = train_here(run_dir, *TINY, "ckpt_path=last")
        best = load_checkpoint(rundir.checkpoint_path(run_dir, rundir.BEST))
        files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        ends[run_dir.name] = (files, best["epoch"], results["best_val_epoch"])
    assert ends["home"] == ends["scratch"], ends
    assert ends["home"][0] == ["best.ckpt", "last.ckpt"]


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


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 32 MiB tmpfs of its own, to fill up for real; skipped where this process cannot mount
    one (mounting needs root, or CAP_SYS_ADMIN)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)],
            capture_output=True,
            text=True,
        )
        why = proc.stderr.strip() if proc.returncode else ""
    except OSError as err:  # no mount command
        why = str(err)
    if why:
        pytest.skip(f"a real full disk needs a small filesystem: `mount -t tmpfs` failed ({why})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)], check=False)


# Where a filled disk stops a run (FillDisk's hook, the bytes it leaves free). At each epoch's end
# the run writes metrics.csv, then curves.png (EpochSummary), then the checkpoints (Lightning
# runs checkpoint callbacks after the others); validation comes before all three.
FULL_DURING = {
    "checkpoints": ("on_train_epoch_end", 0),
    "metrics.csv": ("on_validation_end", 0),
    "curves.png": ("on_validation_end", 8192),  # room for the CSV (one page), not for the plot
}


@pytest.mark.parametrize("victim", list(FULL_DURING))
def test_really_full_disk_stops_in_one_line_and_keeps_last_ckpt(
    small_filesystem: Path, victim: str
) -> None:
    """The disk fills up in epoch 2, before the write of `victim`: the kernel's ENOSPC, through
    torch.save, matplotlib or the CSV writer, becomes the one-line stop; free space, resume."""
    hook, leave = FULL_DURING[victim]
    run_dir = small_filesystem / "run"
    fill_disk = (
        "+callbacks.fill_disk._target_=fill_disk.FillDisk",
        f"+callbacks.fill_disk.folder={small_filesystem}",
        "+callbacks.fill_disk.epoch=1",
        f"+callbacks.fill_disk.hook={hook}",
        f"+callbacks.fill_disk.leave={leave}",
    )
    run = (*TINY, "trainer.max_epochs=3")
    code, stderr = exit_status(lambda: train_here(run_dir, *run, *fill_disk))
    assert code == 1, stderr[-3000:]
    (line,) = error_lines(stderr, "stopped:")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert line.startswith(f"stopped: disk full while writing {run_dir / victim}"), line
    assert f"{last} is intact (saved in epoch 1, step 3)" in line and "ckpt_path=last" in line
    assert "Traceback" not in stderr
    assert load_checkpoint(last)["epoch"] == 0
    assert not list(run_dir.rglob(".*.tmp"))  # the torn temporary file is gone

    (small_filesystem / "filler").unlink()  # free space, then resume as the line says
    train_here(run_dir, *run, "ckpt_path=last")
    assert [row["epoch"] for row in rundir.read_metrics(run_dir / rundir.METRICS)] == [1, 2, 3]


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


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(
    digits_run: tuple[str, Path], tmp_path: Path
) -> None:
    """Before: the new run trained, wrote its config and results over the old run's, and its
    best.ckpt went to best-v1.ckpt, so eval.py read the old run's weights as the new run's."""
    run_dir = copy_run(digits_run[1], tmp_path / "run")
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    code, stderr = exit_status(
        lambda: train_here(run_dir, "experiment=digits", "debug=tiny", "model=resnet_mini")
    )
    assert code == 2
    line = stderr.strip().splitlines()[-1]
    assert re.search(r"already holds a run \(best\.ckpt, last\.ckpt .*ckpt_path=last", line), line
    after = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    assert after == before


def test_a_failed_job_does_not_stop_the_sweep(tmp_path: Path) -> None:
    """With Hydra's basic launcher, a job refused with an `error:` line used to end the whole
    process (sys.exit inside the sweep): the jobs after it never ran and no summary was written.
    Now the job fails alone, the next one trains, the summary names the failed job, and the
    sweep ends with Hydra's report of the failure (exit status 1)."""
    sweep = tmp_path / "sweep"
    proc = run_entry(
        "train.py", "-m", *TINY, "trainer.max_epochs=1", "data.val_fraction=2,0.15",
        f"hydra.sweep.dir={sweep}", check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert error_lines(proc.stderr)[0].startswith("error: data.val_fraction=2 ")
    assert "Error executing job with overrides: [" in proc.stderr and "Traceback" not in proc.stderr
    assert not (sweep / "0_gunn_mini_digits" / rundir.RESULTS).exists()
    assert rundir.read_results(sweep / "1_gunn_mini_digits" / rundir.RESULTS)["epochs"] == 1
    summary = (sweep / "summary.md").read_text()
    assert "1 of 2 jobs finished" in summary
    assert "No results.json (failed or unfinished): 0_gunn_mini_digits." in summary
