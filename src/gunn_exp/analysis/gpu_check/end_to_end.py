"""Part 4 of the GPU check: train.py for two epochs, resumed to a third, then eval.py, on a
generated CIFAR-10 read by the real data pipeline (no download, no network)."""

from __future__ import annotations

import json
import os
import pickle
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gunn_exp.analysis.gpu_check.plan import Plan

ROOT = Path(__file__).resolve().parents[4]  # the checkout: train.py, eval.py, conf/


def write_fake_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images in the CIFAR-10 python-pickle layout torchvision reads; returns `root`.

    5 train batches of n_train/5 rows, a test batch and the meta file, uint8 rows of 3x32x32.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict[str, Any]:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
        }

    files: dict[str, Any] = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
    files["test_batch"] = batch(n_test)
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    for name, content in files.items():
        with (folder / name).open("wb") as f:
            pickle.dump(content, f)
    return root


def _run(args: list[str], timeout: float) -> float:
    """Run an entry point of the checkout; returns its seconds; raises on failure."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, timeout),
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{shlex.join(args)} exited {proc.returncode}:\n" + "\n".join(tail))
    return seconds


def end_to_end(plan: Plan, device: torch.device, deadline: float) -> dict[str, Any]:
    """Part 4: 2 epochs of train.py, resumed to 3, then eval.py, on a generated CIFAR-10."""
    if not (ROOT / "train.py").is_file():
        raise FileNotFoundError(f"{ROOT / 'train.py'} is missing: run from the repo checkout.")
    work = Path(tempfile.mkdtemp(prefix="gunn_gpu_check_"))
    n_train = plan.e2e_batch * plan.e2e_batches_per_epoch
    write_fake_cifar10(work / "data", n_train=n_train, n_test=2 * plan.e2e_batch)
    run_dir = work / "run"
    common = [
        f"model={plan.e2e_model}",
        "data=cifar10",
        f"paths.data_dir={work / 'data'}",
        "data.download=false",
        "data.verify_checksums=false",  # generated files: real format, not the real md5
        f"data.batch_size={plan.e2e_batch}",
        "data.num_workers=0",
        "data.on_device=true",
        f"trainer={'gpu' if plan.gpu else 'cpu'}",
        "logger=csv",
        "channels_last=true",
        f"compile={str(plan.e2e_compile).lower()}",
        f"hydra.run.dir={run_dir}",
        "print_config=false",
    ]
    timings = {}
    timings["train 2 epochs"] = _run(
        ["train.py", *common, "trainer.max_epochs=2"], deadline - time.monotonic()
    )
    timings["resume to epoch 3"] = _run(
        # Extending the run on purpose (a changed schedule is refused without the flag).
        ["train.py", *common, "trainer.max_epochs=3", "ckpt_path=last", "allow_config_change=true"],
        deadline - time.monotonic(),
    )
    results = json.loads((run_dir / "results.json").read_text())
    if results["epochs"] != 3:
        raise RuntimeError(f"resumed run reports {results['epochs']} epochs, expected 3")
    timings["eval.py"] = _run(["eval.py", f"run_dir={run_dir}"], deadline - time.monotonic())
    evals = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "eval").rglob("*.json"))
    if not evals:
        raise RuntimeError(f"eval.py wrote no results under {run_dir / 'eval'}")
    return {
        "command": shlex.join(["python", "train.py", *common]),
        "seconds": timings,
        "epochs": results["epochs"],
        "test_err1": results["test_err1"],
        "eval_outputs": evals,
        "run_dir": str(run_dir),
    }
