"""The singularity probe in training (`callbacks=[default,singularity]`): it changes nothing about
the run, writes its statistics into metrics.csv and to the loggers, and report.py plots them."""

from __future__ import annotations

import csv
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from conftest import exit_status, train_here

from gunn_exp.data import DigitsDataModule
from gunn_exp.models import create_model
from gunn_exp.rundir.checkpoint import load_checkpoint
from gunn_exp.training.singularity import SingularityProbe

RUN = ("experiment=digits", "debug=tiny")  # 2 epochs of 3 batches
PROBE = ("callbacks=[default,singularity]",)


def train_and_rng(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], list[Any]]:
    results = train_here(run_dir, *RUN, *overrides)
    return results, [torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()]


def test_the_probe_changes_nothing_and_reaches_metrics_csv_and_the_loggers(tmp_path: Path) -> None:
    """With and without the probe (after epochs 1 and 2): bitwise the same final weights,
    BatchNorm buffers, results and RNG states (the epoch-1 probe precedes an epoch of training,
    the epoch-2 one is the run's last act on the RNGs)."""
    plain, plain_rng = train_and_rng(tmp_path / "plain")
    probed, probed_rng = train_and_rng(tmp_path / "probed", *PROBE, "logger=tensorboard")

    a = load_checkpoint(tmp_path / "plain" / "checkpoints" / "last.ckpt")["state_dict"]
    b = load_checkpoint(tmp_path / "probed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert torch.equal(plain_rng[0], probed_rng[0])
    assert np.array_equal(plain_rng[1], probed_rng[1]) and plain_rng[2] == probed_rng[2]
    assert plain["test_err1"] == probed["test_err1"]

    with (tmp_path / "probed" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    columns = [k for k in rows[0] if k.startswith("singularity/")]
    sites = {k.split("/")[1] for k in columns if k.count("/") == 2}
    assert sites == {"stages.0.gunn1", "stages.1.gunn1", "stages.2.gunn1"}
    assert len(columns) == 3 * 16 + 1  # 16 statistics per GUNN layer, the probe's time
    assert all(r["singularity/probe_time_s"] for r in rows)
    assert 0 < float(rows[1]["singularity/stages.0.gunn1/inc_corr_mean"]) < 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "probed" / "tensorboard"))
    events.Reload()
    logged = events.Scalars("singularity/stages.2.gunn1/erank")
    assert len(logged) == 2
    # metrics.csv keeps 6 significant digits
    assert logged[-1].value == pytest.approx(
        float(rows[1]["singularity/stages.2.gunn1/erank"]), rel=1e-5
    )


def test_bad_probe_settings_stop_before_training(tmp_path: Path) -> None:
    code, err = exit_status(
        lambda: train_here(tmp_path, *RUN, *PROBE[:1], "callbacks.singularity.every_n_epochs=0")
    )
    assert code == 2 and err.startswith("error: callbacks.singularity.every_n_epochs=0 is invalid")


def test_every_n_epochs_and_one_measurement_per_epoch() -> None:
    """Probed after epochs n, 2n, ... (1-based); asked twice in one epoch (its own hook and
    EpochSummary's), it measures once."""
    torch.manual_seed(0)
    model = create_model("gunn", widths=[16], segments=[2])
    data = DigitsDataModule(num_classes=10, image_size=8)
    data.setup()
    probe = SingularityProbe(every_n_epochs=2, probe_size=16)
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    seen = []
    for epoch in range(4):
        trainer = SimpleNamespace(current_epoch=epoch, datamodule=data)
        first = probe.epoch_metrics(trainer, module)
        assert probe.epoch_metrics(trainer, module) is first
        seen.append(bool(first))
    assert seen == [False, True, False, True]


def test_the_hessian_option_adds_the_lanczos_estimates() -> None:
    torch.manual_seed(0)
    model = create_model("gunn", widths=[16], segments=[2])
    data = DigitsDataModule(num_classes=10, image_size=8)
    data.setup()
    probe = SingularityProbe(probe_size=16, hessian=True, hessian_size=8, hessian_steps=4)
    trainer = SimpleNamespace(current_epoch=0, datamodule=data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = probe.epoch_metrics(trainer, SimpleNamespace(model=model, device=torch.device("cpu")))
    low, high = stats["singularity/hessian/min"], stats["singularity/hessian/max"]
    assert low < 0 < high  # a network at initialisation: negative curvature too
    assert 0 <= stats["singularity/hessian/near_zero"] <= 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.stages[0].gunn1.impl == "recompute"  # the Hessian's `reference` is undone
