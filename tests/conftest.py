"""Shared fixtures: the repo root, a real `train.py` runner, the entry points' work run in this
process, one trained digits run per session, CIFAR files in the real format.

A subprocess pays ~5 s of imports (torch, Lightning) before it does anything: tests run an entry
point as a subprocess where the script itself is under test (its exit status, its output), and
otherwise do its work in this process (`train_here`, `exit_status`, `run_tool`). torch and
Lightning are imported where used: pytest-xdist's controller loads this file and runs no test.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import pickle
import runpy
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from gunn_exp import cli
from gunn_exp.config import validate_config
from gunn_exp.training.schedules import register_resolvers

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

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
    import pytorch_lightning as pl

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
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The generic builder (`gunn`) needs an architecture; every other registered name is complete.
MODEL_EXTRA = {"gunn": {"widths": (8, 12), "segments": (2, 3), "head_width": 16}}


@functools.cache
def registered_model(name: str) -> nn.Module:
    """Registered model `name` (seed 0), built once per session for the model-zoo tests
    (test_models, test_timm_conventions; the big ones take ~1 s each): tests work on a copy."""
    import torch

    from gunn_exp.models import create_model

    torch.manual_seed(0)
    return create_model(name, **MODEL_EXTRA.get(name, {}))


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
    script: str,
    *overrides: str,
    timeout: int = 300,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python <script> <overrides>` from the repo root as a user would (with RUN_ENV, or
    `env`, e.g. wandb offline)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=RUN_ENV if env is None else env,
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


def train_here(run_dir: Path, *overrides: str) -> dict[str, Any]:
    """What `train.py <overrides> hydra.run.dir=<run_dir>` does, in this process: the config check
    before torch loads, then train(cfg); its results."""
    from gunn_exp.training.train import train

    cfg = compose_train(*overrides, "print_config=false", output_dir=run_dir)
    validate_config(cfg, registry=False)
    return train(cfg)


def exit_status(work: Callable[[], object]) -> tuple[int, str]:
    """(exit status, stderr) of an entry point whose `work` stops on an error, in this process:
    the root scripts end through cli.exits_on_error, which maps the error to both."""
    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exited, redirect_stderr(stderr), cli.exits_on_error():
        work()
    return exited.value.code, stderr.getvalue()


def run_tool(script: str, *args: str) -> tuple[int, str, str]:
    """`python <script> <args>` for an argparse tool (classify.py, features.py, export.py), in this
    process: (exit status, stdout, stderr). Its log lines go to pytest's capture (caplog)."""
    main = runpy.run_path(str(ROOT / script))["main"]  # not run as __main__: defines main only
    saved = sys.argv, os.environ.get("PROJECT_ROOT"), logging.getLogger("gunn_exp").level
    sys.argv = [str(ROOT / script), *args]
    os.environ["PROJECT_ROOT"] = str(ROOT)  # what cli.prepare would set, undone below
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = cli.run(main)
            except SystemExit as stop:  # cli.run's exit on a user-facing error, argparse's
                code = stop.code
    finally:
        sys.argv = saved[0]
        if saved[1] is None:
            os.environ.pop("PROJECT_ROOT", None)
        else:
            os.environ["PROJECT_ROOT"] = saved[1]
        logging.getLogger("gunn_exp").setLevel(saved[2])
    return code, stdout.getvalue(), stderr.getvalue()


def shared_run(
    factory: pytest.TempPathFactory, name: str, *overrides: str, env: dict[str, str] | None = None
) -> tuple[str, Path]:
    """`train.py <overrides>` as a user runs it, once per session under `name` (xdist workers
    share it): its stdout and its run directory. Read-only: a test that writes into a run works
    on `copy_run`'s copy."""
    shared = factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above the workers' own
    run_dir, stdout = shared / name, shared / f"{name}.stdout"
    with FileLock(str(shared / f"{name}.lock")):  # the first worker trains, the others wait
        if not stdout.is_file():
            proc = run_entry(
                "train.py", *overrides, f"hydra.run.dir={run_dir}", "print_config=false", env=env
            )
            stdout.write_text(proc.stdout)
    return stdout.read_text(), run_dir


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """`train.py experiment=digits debug=tiny` (2 epochs), once per session (`shared_run`)."""
    return shared_run(tmp_path_factory, "digits_run", "experiment=digits", "debug=tiny")


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of a finished run directory (a few MB), to write into (eval outputs, ...)."""
    shutil.copytree(run_dir, dest)
    return dest


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


@contextmanager
def tmpfs(folder: Path, size: str = "4m", read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs mounted at `folder`: a real filesystem that fills up (or refuses writes),
    for what users meet on a full scratch disk or a read-only share. Needs root (mount); the
    test is skipped where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                           capture_output=True, text=True)  # fmt: skip
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path) -> None:
    """Fill the filesystem of `folder` to the last byte."""
    with (folder / "filler").open("wb", buffering=0) as f:
        try:
            while f.write(b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: the disk is full
            pass
    assert shutil.disk_usage(folder).free == 0


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into: mode 555, or for root (who ignores modes) a read-only
    tmpfs."""
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(folder, read_only=True):
        yield folder
