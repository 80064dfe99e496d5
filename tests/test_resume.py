"""Exact resume: a run stopped (after an epoch, or by SIGTERM mid-epoch) and resumed gives the
numbers of an uninterrupted run, every row of metrics.csv included; on digits (no randomness but
the shuffling) and on CIFAR with every random draw a run makes (augmentation in DataLoader
workers, dropout); `ckpt_path=last|auto` and the wandb run id.

Runs train in this process (conftest.train_here; the run sends itself the signal): train.py's route
from an error to its exit status and one line is test_bad_input's."""

from __future__ import annotations

import csv
import json
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    RUN_ENV,
    cifar10_overrides,
    compose_train,
    copy_run,
    exit_status,
    train_here,
    write_cifar,
)
from PIL import Image
from torch.utils.data import Dataset
from wandb_records import read_offline_run

from gunn_exp.data.seeding import SeededSamples
from gunn_exp.data.transforms import cifar_train_transform
from gunn_exp.errors import CheckpointError
from gunn_exp.rundir import WANDB_ID as WANDB_ID_FILE
from gunn_exp.training.loggers import wandb_resume_kwargs
from gunn_exp.training.resume import resolve_ckpt_path
from gunn_exp.training.schedules import register_resolvers

register_resolvers()

# 4 epochs of 6 batches; the cosine schedule's length is fixed so a 2-epoch run is the first half
# of the 4-epoch one.
RUN = (
    "experiment=digits",
    "debug=tiny",
    "trainer.limit_train_batches=6",
    "scheduler.T_max=4",
    "print_config=false",
)
RESULTS = (
    "epochs", "test_err1", "test_err5", "test_loss", "best_val_err1", "best_val_epoch",
    "final_val_err1",
)  # fmt: skip


def train(run_dir: Path, *overrides: str) -> dict:
    """`train.py <RUN> <overrides>` into `run_dir`, in this process."""
    return train_here(run_dir, *RUN, *overrides)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k != "epoch_time_s"} for row in csv.DictReader(f)]


def results(run_dir: Path) -> dict[str, float]:
    data = json.loads((run_dir / "results.json").read_text())
    return {k: data[k] for k in RESULTS}


@pytest.fixture(scope="module", params=["digits", "random_cifar"])
def setting(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The overrides of RUN's data and model. `digits`: nothing random but the shuffling.
    `random_cifar`: every random draw a run makes, on generated CIFAR files: the flip, crop and
    Jigsaw shift inside 2 (persistent) DataLoader workers, and dropout before the classifier."""
    if request.param == "digits":
        return ()
    root = write_cifar(tmp_path_factory.mktemp("cifar"), n_train=80)
    return (
        *cifar10_overrides(root),
        "data.num_workers=2",
        "model=gunn_mini",
        "model.drop_rate=0.5",
    )


@pytest.fixture(scope="module")
def uninterrupted(setting: tuple, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(run_dir, "trainer.max_epochs=4", *setting)
    return run_dir


def test_two_epochs_resumed_to_four_equal_four_epochs(
    setting: tuple, uninterrupted: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    train(run_dir, "trainer.max_epochs=2", *setting)
    assert [r["epoch"] for r in metrics(run_dir)] == ["1", "2"]
    # A longer run than the one resumed: a new length proceeds (one warning line, README).
    with caplog.at_level(logging.INFO, logger="gunn_exp"):
        train(run_dir, "trainer.max_epochs=4", "ckpt_path=last", *setting)
    assert "resuming from" in caplog.text
    assert metrics(run_dir) == metrics(uninterrupted)  # every column of every epoch
    assert results(run_dir) == results(uninterrupted)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_ckpt_path_auto_leaves_a_finished_run_as_it_is(
    setting: tuple, uninterrupted: Path, tmp_path: Path
) -> None:
    """A finished run started again with ckpt_path=auto (a sweep's finished job when the sweep
    is run again) is neither trained nor tested again: its files stay as they were, byte for
    byte, and train() returns its stored results. Another training value is no such run: the
    ordinary resume refuses it."""
    run_dir = copy_run(uninterrupted, tmp_path / "run")

    def files() -> dict[Path, tuple[bytes, int]]:
        return {
            p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()
        }

    before = files()
    returned = train(run_dir, "trainer.max_epochs=4", "ckpt_path=auto", *setting)
    assert files() == before
    assert returned == json.loads((run_dir / "results.json").read_text())
    code, stderr = exit_status(
        lambda: train(run_dir, "trainer.max_epochs=4", "ckpt_path=auto", "seed=1", *setting)
    )
    assert (
        code == 2
        and "with a config that trains differently" in stderr
        and "seed: run 0, now 1" in stderr
    )


def stop_in_epoch_2(run_dir: Path, *overrides: str) -> tuple[int, str]:
    """A 4-epoch run that gets SIGTERM after batch 3 of epoch 2 (sent by the run itself, so the
    moment does not depend on the machine's speed); (exit status, stderr)."""
    stop = (
        "trainer.max_epochs=4",
        *overrides,
        "+callbacks.signal_at._target_=signal_at.SignalAt",
        f"+callbacks.signal_at.signum={int(signal.SIGTERM)}",
        "+callbacks.signal_at.epoch=1",
        "+callbacks.signal_at.batch=2",
    )
    return exit_status(lambda: train(run_dir, *stop))


def test_sigterm_mid_epoch_checkpoints_and_resumes_exactly(
    setting: tuple, uninterrupted: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    returncode, stderr = stop_in_epoch_2(run_dir, *setting)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = re.search(r"^stopped: SIGTERM in epoch \d .*ckpt_path=last", stderr, re.M)
    assert stopped, stderr[-3000:]

    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    done = ckpt["callbacks"]["EpochSeeding"]["batches"]
    assert ckpt["epoch"] >= 1 and 0 < done < 6, "the checkpoint should be from mid-epoch"

    train(run_dir, "trainer.max_epochs=4", "ckpt_path=last", *setting)
    assert results(run_dir) == results(uninterrupted)
    # The interrupted epoch's training averages too: the checkpoint kept the epoch's sums.
    assert metrics(run_dir) == metrics(uninterrupted)


def test_on_device_loader_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    """data.on_device=true (the GPU fast path, here on the CPU): stopped mid-epoch and resumed,
    every epoch and the final test equal an uninterrupted run's."""
    data = (
        *cifar10_overrides(write_cifar(tmp_path / "cifar", n_train=80)),
        "model=gunn_mini",
        "data.on_device=true",
    )
    reference = tmp_path / "uninterrupted" / "run"
    train(reference, "trainer.max_epochs=4", *data)
    run_dir = tmp_path / "stopped" / "run"
    run_dir.parent.mkdir()
    returncode, stderr = stop_in_epoch_2(run_dir, *data)
    assert returncode == 128 + signal.SIGTERM, stderr[-3000:]
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=True)
    assert 0 < ckpt["callbacks"]["EpochSeeding"]["batches"] < 6, "not a mid-epoch checkpoint"

    train(run_dir, "trainer.max_epochs=4", "ckpt_path=last", *data)
    assert results(run_dir) == results(reference)
    assert metrics(run_dir) == metrics(reference)


class OneImage(Dataset):
    """`n` samples of one random 32x32 image through CIFAR's training augmentation: what tells
    the samples apart is only their random draws."""

    def __init__(self, n: int) -> None:
        pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(0))
        self.image, self.n = Image.fromarray(pixels.to(torch.uint8).numpy()), n
        self.transform = cifar_train_transform("cifar10")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)


def test_a_samples_augmentation_depends_only_on_its_key_and_index() -> None:
    """What makes augmentation in DataLoader workers exact across a resume (data/seeding.py)."""
    samples = SeededSamples(OneImage(16))
    state = torch.get_rng_state()
    first = [samples[(i, 1)] for i in range(16)]
    assert torch.equal(torch.get_rng_state(), state)  # the training's own stream is untouched
    assert len({t.numpy().tobytes() for t in first}) > 12  # each sample its own flip, crop, shift
    torch.rand(3)  # whatever was drawn before, in whatever order
    assert all(torch.equal(samples[(i, 1)], first[i]) for i in reversed(range(16)))
    assert not all(torch.equal(samples[(i, 2)], first[i]) for i in range(16))  # another epoch


def test_ckpt_path_last_without_a_checkpoint_names_the_fix(tmp_path: Path) -> None:
    code, stderr = exit_status(lambda: train(tmp_path / "run", "ckpt_path=last"))
    assert code == 2  # bad input, as in every entry point (errors.exit_code)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: ckpt_path=last")]
    assert len(lines) == 1 and "hydra.run.dir=" in lines[0], stderr[-2000:]
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing to resume: a fresh start
    with pytest.raises(CheckpointError, match="hydra.run.dir"):
        resolve_ckpt_path("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.touch()
    assert resolve_ckpt_path("last", tmp_path) == last
    assert resolve_ckpt_path("auto", tmp_path) == last
    assert resolve_ckpt_path(str(last), Path("/elsewhere")) == last


def test_wandb_run_id_is_kept_with_the_run_directory(tmp_path: Path) -> None:
    assert wandb_resume_kwargs(compose_train("logger=none"), tmp_path) == {}
    cfg = compose_train("logger=wandb")
    first = wandb_resume_kwargs(cfg, tmp_path)
    assert first["resume"] == "allow" and first["id"]
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == first["id"]
    assert wandb_resume_kwargs(cfg, tmp_path) == first  # the resumed run: same wandb run
    explicit = compose_train("logger=wandb", "logger.wandb.id=abc123")
    assert wandb_resume_kwargs(explicit, tmp_path)["id"] == "abc123"


@pytest.mark.slow
def test_resumed_run_continues_the_wandb_run(tmp_path: Path) -> None:
    """Offline wandb: the first run and its resumption write runs with one id."""
    run_dir = tmp_path / "run"
    env = {
        **RUN_ENV,
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),  # staged artifacts, not in ~
    }
    extend = ["trainer.max_epochs=2", "ckpt_path=last", "allow_config_change=true"]
    # Checkpoint artifacts: at every save in the first run, at the end in the resumed one.
    first = ["trainer.max_epochs=1", "logger.wandb.log_model=all"]
    for overrides in (first, [*extend, "logger.wandb.log_model=true"]):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *RUN,
                "logger=wandb",
                f"hydra.run.dir={run_dir}",
                *overrides,
            ],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
            timeout=300,
        )
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    offline_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2 and all(name.endswith(run_id) for name in offline_runs)
    # One artifact history across the resume: versions of model-<run id>, epochs 1 then 2.
    runs = [
        read_offline_run(next((run_dir / "wandb" / name).glob("run-*.wandb")))
        for name in offline_runs
    ]
    for run, epoch in zip(runs, (1, 2), strict=True):
        models = [a for a in run.artifacts if a["type"] == "model"]
        assert {a["name"] for a in models} == {f"model-{run_id}"}
        (last,) = [a for a in models if "last" in a["aliases"]]
        assert last["metadata"]["epoch"] == epoch and last["metadata"]["model"] == "gunn_mini"
