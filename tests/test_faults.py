"""Nothing lost: atomic checkpoint writes under SIGKILL, a checkpoint on a signal, a clean stop on
a non-finite loss, and clear refusals of corrupt or mismatched checkpoints."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import RUN_ENV, exit_status, quiet_trainer, train_here
from signal_at import SignalAt
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gunn_exp.errors import CheckpointError, Interrupted, NonFiniteLoss
from gunn_exp.models import create_model
from gunn_exp.rundir import read_metrics
from gunn_exp.rundir.checkpoint import load_checkpoint
from gunn_exp.training.checkpoints import AtomicCheckpointIO
from gunn_exp.training.faults import FiniteLossGuard, GracefulStop
from gunn_exp.training.resume import check_resumable, resolve_ckpt_path

TINY = ("experiment=digits", "debug=tiny", "print_config=false")


class Unpicklable:
    def __reduce__(self):  # noqa: ANN204
        raise RuntimeError("disk full")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "version": 1}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {}, "big": torch.zeros(100_000), "x": Unpicklable()}, path
        )
    assert load_checkpoint(path)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


# Saves version 1 of a checkpoint, then version 2 through a file that takes its first TORN_AT
# bytes, puts them on disk and SIGKILLs the process: every run of the test is killed inside the
# write, after part of the bytes are on disk.
TORN_AT = 1_000_000
KILLED_INSIDE_A_SAVE = f"""
import os, signal, sys, torch
from gunn_exp.training.checkpoints import AtomicCheckpointIO

class KillAfter:
    def __init__(self, f, limit):
        self.f, self.left = f, limit

    def write(self, data):
        data = bytes(data)
        if len(data) < self.left:
            self.left -= len(data)
            return self.f.write(data)
        self.f.write(data[: self.left])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    def flush(self):
        self.f.flush()

def checkpoint(version):
    return {{"state_dict": {{"w": torch.full((1_000_000,), float(version))}}, "version": version}}

AtomicCheckpointIO().save_checkpoint(checkpoint(1), sys.argv[1])
save = torch.save
torch.save = lambda obj, f, *args, **kwargs: save(obj, KillAfter(f, {TORN_AT}), *args, **kwargs)
AtomicCheckpointIO().save_checkpoint(checkpoint(2), sys.argv[1])
"""


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_INSIDE_A_SAVE, str(last)],
        env=RUN_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]  # killed, not finished
    (torn,) = [p for p in last.parent.iterdir() if p != last]
    assert torn.stat().st_size == TORN_AT  # the write was under way: a torn file on disk
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(torn)
    ckpt = load_checkpoint(last)  # the previous checkpoint, whole
    assert ckpt["version"] == 1 and torch.all(ckpt["state_dict"]["w"] == 1)
    # The torn file is never taken for a checkpoint: not by a resume, not by a *.ckpt listing.
    assert resolve_ckpt_path("auto", tmp_path) == last
    assert list(last.parent.glob("*.ckpt")) == [last]
    # The next save replaces it.
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "version": 3}, last)
    assert load_checkpoint(last)["version"] == 3 and list(last.parent.iterdir()) == [last]


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path: Path) -> None:
    # lr x1e30 after the first epoch: the second epoch diverges.
    run_dir = tmp_path / "run"
    code, stderr = exit_status(
        lambda: train_here(
            run_dir,
            *TINY,
            "trainer.max_epochs=3",
            "scheduler=multistep",
            "scheduler.milestones=[1]",
            "scheduler.gamma=1e30",
        )
    )
    assert code == 1
    lines = [ln for ln in stderr.splitlines() if ln.startswith("stopped:")]
    assert len(lines) == 1 and "non-finite training loss" in lines[0], stderr[-2000:]
    assert str(run_dir / "checkpoints/last.ckpt") in lines[0]
    ckpt = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert ckpt["epoch"] == 0  # the end of the first (good) epoch
    weights = [t for t in ckpt["state_dict"].values() if t.is_floating_point()]
    assert all(torch.isfinite(t).all() for t in weights)
    assert not (run_dir / "results.json").exists()


def test_corrupt_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    bad, run_dir = tmp_path / "bad.ckpt", tmp_path / "run"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    code, stderr = exit_status(lambda: train_here(run_dir, *TINY, f"ckpt_path={bad}"))
    assert code == 2  # bad input, as in every entry point (errors.exit_code)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error: checkpoint")]
    assert len(lines) == 1 and "corrupt" in lines[0] and str(bad) in lines[0], stderr[-2000:]
    assert not (run_dir / "config.yaml").exists()  # refused before writing anything


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "the file is empty"),
        (b"\xf0" * 1000, "the safe unpickler stopped at: Unsupported operand 240"),
        (b"PK\x03\x04 not a zip", "RuntimeError: PytorchStreamReader failed reading zip archive"),
    ],
    ids=["empty", "random_bytes", "broken_zip"],
)
def test_corrupt_bytes_are_called_corrupt_not_unsafe(
    content: bytes, why: str, tmp_path: Path
) -> None:
    """Bytes that are no pickle at all are a damaged file, not a checkpoint that asks to run code
    (the safe unpickler refuses both), and the line quotes torch's reason, not its advice."""
    path = tmp_path / "last.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert "\n" not in message and "asks to run" not in message, message
    assert f"{path} is corrupt or not a PyTorch file ({why}" in message, message


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(10_000)}}, path)
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def training_checkpoint(run_dir: Path, model: nn.Module, model_name: str) -> Path:
    """A checkpoint laid out like train.py's: <run>/checkpoints/last.ckpt beside config.yaml."""
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"model:\n  name: {model_name}\n")
    path = run_dir / "checkpoints" / "last.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "epoch": 3,
            "global_step": 40,
            "loops": {},
            "optimizer_states": [],
            "callbacks": {},
        },
        path,
    )
    return path


def test_checkpoint_of_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    path = training_checkpoint(
        tmp_path / "run", create_model("gunn_mini", num_classes=10), "gunn_mini"
    )
    check_resumable(
        load_checkpoint(path), path, create_model("gunn_mini", num_classes=10), "gunn_mini"
    )
    with pytest.raises(CheckpointError, match="does not match model gunn_mini: .*shape") as err:
        check_resumable(
            load_checkpoint(path), path, create_model("gunn_mini", num_classes=7), "gunn_mini"
        )
    assert "fc.weight [10, " in str(err.value)
    with pytest.raises(CheckpointError, match=r"resnet18_cifar.*written by a run of .*gunn_mini"):
        check_resumable(
            load_checkpoint(path),
            path,
            create_model("resnet18_cifar", num_classes=10),
            "resnet18_cifar",
        )


def test_weights_only_checkpoint_points_to_init_from(tmp_path: Path) -> None:
    path = tmp_path / "weights.ckpt"
    model = create_model("gunn_mini", num_classes=10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match="init_from="):
        check_resumable(load_checkpoint(path), path, model, "gunn_mini")


class Tiny(pl.LightningModule):
    """A linear model whose loss turns nan at `nan_at_step` (if given)."""

    def __init__(self, nan_at_step: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.nan_at_step = nan_at_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):  # noqa: ANN201
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y)
        return loss * float("nan") if self.global_step == self.nan_at_step else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(module: pl.LightningModule, root: Path, callbacks: list[pl.Callback]) -> pl.Trainer:
    data = DataLoader(TensorDataset(torch.randn(40, 4), torch.randn(40, 1)), batch_size=4)
    trainer = quiet_trainer(
        max_epochs=2, default_root_dir=root, enable_checkpointing=False, callbacks=callbacks
    )
    trainer.fit(module, data)
    return trainer


def test_signal_saves_then_hands_over_to_the_previous_handler(tmp_path: Path) -> None:
    """The checkpoint comes first; then e.g. submitit's requeue handler runs."""
    calls: list[bool] = []
    last = tmp_path / "checkpoints" / "last.ckpt"
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(last.is_file()))
    try:
        stop = GracefulStop(str(tmp_path / "checkpoints"), ["SIGUSR2"])
        with pytest.raises(Interrupted) as err:
            fit(Tiny(), tmp_path, [SignalAt(signal.SIGUSR2, batch=3), stop])
        assert err.value.exit_code == 128 + signal.SIGUSR2
        assert calls == [True]  # called once, after last.ckpt was written
        # Stopped after the batch the signal arrived in (batch 4 of 10 of the first epoch).
        assert load_checkpoint(last)["global_step"] == 4
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_stops_at_the_next_batch_end_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGTERM (SLURM, kill): last.ckpt at the end of the next batch, then Interrupted."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    stop = GracefulStop(str(tmp_path / "checkpoints"))
    with pytest.raises(Interrupted) as err:
        fit(Tiny(), tmp_path, [SignalAt(signal.SIGTERM, batch=3), stop])
    assert err.value.exit_code == 128 + signal.SIGTERM
    assert str(err.value).startswith("SIGTERM in epoch 1 after batch 4/10")
    assert load_checkpoint(last)["global_step"] == 4


def test_nan_loss_stops_before_the_step_updates_the_weights(tmp_path: Path) -> None:
    module = Tiny(nan_at_step=5)
    weights: list[torch.Tensor] = []

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            weights.append(pl_module.layer.weight.detach().clone())

    with pytest.raises(NonFiniteLoss, match="nan.*step 5"):
        fit(module, tmp_path, [Snapshot(), FiniteLossGuard(str(tmp_path))])
    assert len(weights) == 5 and torch.equal(module.layer.weight, weights[-1])


def ctrl_c(run_train, times: int) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`train.py` (3 epochs of 3 batches) that gets SIGINT `times` times in a row at the end of
    the first batch of epoch 2 (after graceful_stop's check of that batch), as from a terminal's
    Ctrl-C: a real signal to a real train.py process."""
    return run_train(
        *TINY,
        "trainer.max_epochs=3",
        "+callbacks.signal_at._target_=signal_at.SignalAt",
        f"+callbacks.signal_at.signum={int(signal.SIGINT)}",
        "+callbacks.signal_at.epoch=1",
        "+callbacks.signal_at.batch=0",
        f"+callbacks.signal_at.times={times}",
        check=False,
    )


def test_ctrl_c_saves_a_checkpoint_after_the_batch_and_exits_130(run_train) -> None:
    proc, run_dir = ctrl_c(run_train, times=1)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("stopped:")]
    assert line.startswith("stopped: SIGINT in epoch 2 after batch 2/3: checkpoint saved to")
    assert f"ckpt_path=last hydra.run.dir={run_dir}" in line and "Traceback" not in proc.stderr
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 5)  # epoch 2, after the next batch
    assert not (run_dir / "results.json").exists()


def test_second_ctrl_c_quits_at_once_without_a_checkpoint(run_train) -> None:
    proc, run_dir = ctrl_c(run_train, times=2)
    # Lightning ends a run on KeyboardInterrupt with its own message and sys.exit(1).
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "checkpoint saved" not in proc.stderr and "stopped:" not in proc.stderr
    # last.ckpt is still the end of epoch 1: no checkpoint after the batch, nothing trained on.
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 3)
    assert [row["epoch"] for row in read_metrics(run_dir / "metrics.csv")] == [1]
