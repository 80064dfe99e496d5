"""Shared fixtures: the repo root, a real `train.py` runner, CIFAR files in the real format."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gunn_exp.training.schedules import register_resolvers

ROOT = Path(__file__).resolve().parents[1]

# Fast, quiet, offline settings for every subprocess run of an entry point.
RUN_ENV = {
    **os.environ,
    "WANDB_MODE": "disabled",
    "HYDRA_FULL_ERROR": "0",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
}  # tests/ on the path: subprocess runs can use test callbacks (signal_at.SignalAt)


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, progress bar or model summary: in-process tests of hooks."""
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one thread avoids OpenMP hand-offs that dominate on 2 shared cores
    (subprocesses get the same through OMP_NUM_THREADS in RUN_ENV)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(
    name: str, *overrides: str, output_dir: Path | None = None, keep_hydra: bool = False
) -> DictConfig:
    """The config `<name>.py <overrides>` would get (train, eval, ...), composed in-process: the
    one way tests compose configs (no run is started).

    Hydra's runtime node is filled in as in a real run (run directory `output_dir`), so
    `${hydra:...}` interpolations resolve; the `hydra` node itself is dropped unless `keep_hydra`
    (to inspect sweeper/launcher configs).
    """
    register_resolvers()  # as the root scripts do (cli.prepare)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir or "/tmp/gunn-exp-compose")
    cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    return cfg


def compose_train(
    *overrides: str, output_dir: Path | None = None, keep_hydra: bool = False
) -> DictConfig:
    """`compose_config("train", ...)`: the config of `train.py <overrides>`."""
    return compose_config("train", *overrides, output_dir=output_dir, keep_hydra=keep_hydra)


def run_entry(
    script: str, *overrides: str, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run `python <script> <overrides>` from the repo root as a user would."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=RUN_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} {' '.join(overrides)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture
def run_train(tmp_path: Path) -> Callable[..., tuple[subprocess.CompletedProcess[str], Path]]:
    """Run train.py into a fresh run directory under tmp_path; returns (process, run_dir)."""

    def run(*overrides: str, check: bool = True, run_dir: Path | None = None, timeout: int = 300):
        run_dir = run_dir or tmp_path / "run"
        proc = run_entry(
            "train.py",
            f"hydra.run.dir={run_dir}",
            "print_config=false",
            *overrides,
            check=check,
            timeout=timeout,
        )
        return proc, run_dir

    return run


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 40, n_test: int = 20) -> Path:
    """Write a small CIFAR-10/100 in torchvision's python-pickle layout (what the real tarball
    extracts to): 5 train batches + test batch + meta, uint8 rows of 3x32x32 values."""
    rng = np.random.default_rng(0)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n: int) -> dict:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, classes, size=n).tolist(),
        }

    if name == "cifar10":
        files = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
        files["test_batch"] = batch(n_test)
        files["batches.meta"] = {"label_names": [f"class{i}" for i in range(classes)]}
    else:
        files = {"train": batch(n_train), "test": batch(n_test)}
        files["meta"] = {"fine_label_names": [f"class{i}" for i in range(classes)]}
    for fname, content in files.items():
        with (folder / fname).open("wb") as f:
            pickle.dump(content, f)
    return root


def cifar10_overrides(root: Path) -> tuple[str, ...]:
    """train.py overrides that read the generated CIFAR-10 under `root` quickly and offline."""
    return (
        "data=cifar10",
        f"paths.data_dir={root}",
        "data.download=false",
        "data.verify_checksums=false",  # generated files: real format, not the real md5
        "data.num_workers=0",
        "data.batch_size=8",
    )


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root
