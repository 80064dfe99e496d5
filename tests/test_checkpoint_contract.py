"""The run contract's checkpoints: loaded without running code, and usable on their own.

A checkpoint from a colleague or a forum must not run code when any script loads it (each of
eval.py, classify.py, export.py, features.py, a resume, a fine-tuning start); and a checkpoint
copied out of its run directory still evaluates and classifies, because it describes its run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, copy_run, exit_status, run_tool, train_here
from PIL import Image
from sklearn.datasets import load_digits

from gunn_exp.errors import CheckpointError
from gunn_exp.inference.evaluate import evaluate
from gunn_exp.rundir.checkpoint import DESCRIPTION_KEY, RunDescription, load_checkpoint
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.training.checkpoints import AtomicCheckpointIO


class CreatesFileOnLoad:
    """Unpickling this calls `open(path, "w")`: what any malicious pickle does, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


@pytest.fixture
def evil(digits_run, tmp_path: Path) -> tuple[Path, Path]:
    """(a real run's best.ckpt with a code-running object added, the file loading it creates)."""
    marker = tmp_path / "pwned"
    ckpt = load_checkpoint(digits_run[1] / "checkpoints" / "best.ckpt")
    ckpt["extra"] = CreatesFileOnLoad(marker)
    path = tmp_path / "from_a_forum" / "model.ckpt"
    path.parent.mkdir()
    torch.save(ckpt, path)
    return path, marker


@pytest.fixture
def image(tmp_path: Path) -> Path:
    pixels = (load_digits().images[0] * 255 / 16).round().astype(np.uint8)
    path = tmp_path / "digit.png"
    Image.fromarray(pixels, mode="L").save(path)
    return path


def test_the_malicious_checkpoint_really_runs_code_when_unpickled(evil) -> None:
    """The control: without weights_only the file is created, so the refusals below mean it."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.is_file()


def refused_in_one_line(code: int, stderr: str, path: Path, marker: Path) -> None:
    assert code == 2, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert str(path) in lines[0] and "was not loaded" in lines[0] and "`io.open`" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("script", ["classify.py", "features.py", "export.py"])
def test_tools_refuse_a_checkpoint_that_would_run_code(
    evil, image: Path, tmp_path: Path, script: str
) -> None:
    path, marker = evil
    args = {
        "classify.py": [str(path), str(image)],
        "features.py": [str(path), str(image), "-o", str(tmp_path / "features.npy")],
        "export.py": [str(path), "--out", str(tmp_path / "export")],
    }[script]
    code, _, stderr = run_tool(script, *args)
    refused_in_one_line(code, stderr, path, marker)


def test_eval_refuses_a_checkpoint_that_would_run_code(evil) -> None:
    path, marker = evil
    code, stderr = exit_status(lambda: evaluate(compose_config("eval", f"ckpt_path={path}")))
    refused_in_one_line(code, stderr, path, marker)


@pytest.mark.parametrize("key", ["ckpt_path", "init_from"])
def test_training_refuses_a_checkpoint_that_would_run_code(evil, tmp_path: Path, key: str) -> None:
    """A resume (`ckpt_path=`) and a fine-tuning start (`init_from=`)."""
    path, marker = evil
    run = tmp_path / "run"
    code, stderr = exit_status(
        lambda: train_here(run, "experiment=digits", "debug=tiny", f"{key}={path}")
    )
    refused_in_one_line(code, stderr, path, marker)


def test_lightnings_own_checkpoint_loads_are_safe(evil) -> None:
    """Lightning reads a resumed checkpoint through the strategy's CheckpointIO: ours."""
    path, marker = evil
    with pytest.raises(CheckpointError, match="was not loaded"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_a_checkpoint_describes_its_run(digits_run) -> None:
    run_dir = digits_run[1]
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    described = RunDescription.from_checkpoint(ckpt, "last.ckpt")
    assert described is not None and ckpt[DESCRIPTION_KEY]["format"] == 1
    assert described.model == "gunn_mini"
    assert described.model_args["num_classes"] == 10 and "_target_" not in described.model_args
    assert described.classes == json.loads((run_dir / "classes.json").read_text())
    assert Preprocessing.from_dict(described.preprocessing) == Preprocessing.read(run_dir)
    assert described.config["model"]["name"] == "gunn_mini"
    assert described.config["data"]["name"] == "digits"


def test_a_checkpoint_copied_out_of_its_run_evaluates_and_classifies(
    digits_run, tmp_path: Path, image: Path
) -> None:
    """No config.yaml, classes.json or preprocessing.json anywhere near the copy."""
    run_dir = digits_run[1]
    alone = tmp_path / "elsewhere" / "gunn_digits.ckpt"
    alone.parent.mkdir()
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", alone)

    results = evaluate(compose_config("eval", f"ckpt_path={alone}"))
    assert Path(results["output_dir"]) == alone.parent / "eval" / "gunn_digits"
    assert results["model"] == "gunn_mini" and results["data"] == "digits"
    copy = copy_run(run_dir, tmp_path / "run")  # eval writes into the run: not the shared one
    in_run = evaluate(compose_config("eval", f"ckpt_path={copy / 'checkpoints/best.ckpt'}"))
    assert results["err1"] == in_run["err1"] and results["loss"] == in_run["loss"]

    code, stdout, stderr = run_tool("classify.py", str(alone), str(image))
    assert code == 0, stderr
    classes = json.loads((run_dir / "classes.json").read_text())
    assert any(line.strip().startswith("1. ") for line in stdout.splitlines())
    assert sum(name in stdout for name in classes) >= 1


def test_a_description_this_version_cannot_read_is_refused(digits_run, tmp_path: Path) -> None:
    ckpt = load_checkpoint(digits_run[1] / "checkpoints" / "best.ckpt")
    ckpt[DESCRIPTION_KEY] = {"format": 99}
    path = tmp_path / "future.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"format 99"):
        RunDescription.from_checkpoint(load_checkpoint(path), path)
