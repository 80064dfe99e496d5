"""Nothing lost: atomic checkpoint writes under SIGKILL, a checkpoint on a signal, a clean stop on
a non-finite loss, and clear refusals of corrupt or mismatched checkpoints."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
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
from gunn_exp.rundir.checkpoint import load_checkpoint
from gunn_exp.training.checkpoints import AtomicCheckpointIO
from gunn_exp.training.faults import FiniteLossGuard, GracefulStop
from gunn_exp.training.resume import check_resumable

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


SAVE_FOREVER = """
import sys, torch
from gunn_exp.training.checkpoints import AtomicCheckpointIO
for i in range(10**6):
    state = {"w": torch.full((4_000_000,), float(i))}
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "i": i}, sys.argv[1])
    print(i, flush=True)
"""


def test_sigkill_during_saves_never_leaves_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_FOREVER, str(path)],
        env=RUN_ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    saved = [int(proc.stdout.readline()) for _ in range(3)]
    time.sleep(0.01)  # 16 MB per save: the kill lands in the middle of one
    proc.kill()
    proc.wait()
    ckpt = load_checkpoint(path)
    assert ckpt["i"] >= saved[-1]
    assert torch.all(ckpt["state_dict"]["w"] == ckpt["i"])


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
