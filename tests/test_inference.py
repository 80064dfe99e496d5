"""Using a finished run: eval.py, classify.py, features.py, fine-tuning with init_from, and the
refusals (unreadable images, checkpoints of another model). The session's tiny digits run serves
them all (a copy: eval writes into it). The scripts run in this process (conftest.run_tool,
exit_status); eval.py as a subprocess is test_template's train-then-eval, and each script's route
to exit 2 is test_bad_input's."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    cifar10_overrides,
    compose_config,
    copy_run,
    exit_status,
    run_tool,
    train_here,
)
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_digits

from gunn_exp.errors import CheckpointError, ConfigError, RunError
from gunn_exp.inference.evaluate import evaluate
from gunn_exp.inference.predict import classify_images
from gunn_exp.inference.run import find_checkpoint, list_images, load_run, pooled_features
from gunn_exp.models import create_model
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.rundir.weights import init_from_checkpoint

DIGITS = 3  # images written as PNG files for classify/features


@pytest.fixture(scope="module")
def run_dir(digits_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's `train.py experiment=digits debug=tiny` run (2 epochs)."""
    return copy_run(digits_run[1], tmp_path_factory.mktemp("inference") / "run")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three sklearn digits as 8x8 grey PNGs (their original resolution), a corrupt PNG and a
    text file that folder search must ignore."""
    folder = tmp_path_factory.mktemp("images")
    digits = load_digits()
    for i in range(DIGITS):
        pixels = (digits.images[i] * 255 / 16).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit{i}_label{digits.target[i]}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def foreign_checkpoint(path: Path) -> Path:
    """A Lightning-style checkpoint of a GUNN with other widths than gunn_mini."""
    model = create_model("gunn", widths=(16, 32), segments=(2, 4), stem_width=16, num_classes=10)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


def read_csv(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


def test_eval_best_writes_confusion_matrix_and_per_class_error(run_dir: Path) -> None:
    evaluate(compose_config("eval", f"run_dir={run_dir}"))  # eval.py run_dir=<run>
    out = run_dir / "eval" / "best"
    results = json.loads((out / "results.json").read_text())
    assert results["images"] == 360 and results["data"] == "digits"  # the whole test split
    assert (out / "confusion_matrix.png").stat().st_size > 0
    matrix = read_csv(out / "confusion_matrix.csv")
    assert matrix[0][1:] == [str(c) for c in range(10)]
    counts = np.array([[int(v) for v in row[1:]] for row in matrix[1:]])
    assert counts.sum() == 360
    assert 100 * (1 - np.trace(counts) / 360) == pytest.approx(results["err1"], abs=1e-3)
    per_class = read_csv(out / "per_class_error.csv")
    assert per_class[0] == ["index", "class", "images", "errors", "err1"]
    assert [int(r[2]) for r in per_class[1:]] == counts.sum(1).tolist()
    assert sum(int(r[3]) for r in per_class[1:]) == 360 - np.trace(counts)


def test_eval_on_other_data_with_the_same_classes(run_dir: Path, cifar_root: Path) -> None:
    # data=<name> replaces the run's data config; the digits model reads 3-channel images.
    cfg = compose_config(
        "eval",
        f"run_dir={run_dir}",
        "data=cifar10",
        f"paths.data_dir={cifar_root}",
        "data.download=false",
        "data.verify_checksums=false",
        "num_workers=0",
    )
    evaluate(cfg)
    results = json.loads((run_dir / "eval" / "best_cifar10" / "results.json").read_text())
    assert results["data"] == "cifar10" and results["images"] == 20


@pytest.mark.parametrize(
    ("override", "message"),
    [("data=cifar100", "has 100 classes but the model"), ("ten_crop=true", "ten_crop=true")],
)
def test_eval_refuses_data_that_cannot_work(run_dir: Path, override: str, message: str) -> None:
    # The exit status and line of such an error: the checkpoint test below.
    cfg = compose_config("eval", f"run_dir={run_dir}", override)
    with pytest.raises(ConfigError, match=message):
        evaluate(cfg)


def test_eval_refuses_a_checkpoint_of_another_model(run_dir: Path, tmp_path: Path) -> None:
    ckpt = foreign_checkpoint(tmp_path / "other.ckpt")
    code, stderr = exit_status(  # eval.py run_dir=... ckpt=<other.ckpt>
        lambda: evaluate(compose_config("eval", f"run_dir={run_dir}", f"ckpt={ckpt}"))
    )
    assert code == 2
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("error: checkpoint") and "does not match model gunn_mini" in error
    assert "stem.0.weight [16, 3, 3, 3] in the checkpoint vs [32, 3, 3, 3] in the model" in error


def test_classify_prints_top5_and_skips_an_unreadable_file(
    run_dir: Path, image_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, stdout, stderr = run_tool("classify.py", str(run_dir), str(image_dir))
    assert code == 0
    stderr += caplog.text  # the skipped file is logged (to stderr when run as a script)
    lines = stdout.splitlines()
    names = [line for line in lines if not line.startswith(" ")]
    assert names == sorted(p.name for p in image_dir.glob("digit*.png"))
    ranks = [line.split() for line in lines if line.startswith(" ")]
    assert len(ranks) == 5 * DIGITS and all(r[1] in "0123456789" for r in ranks)
    assert "broken.png" in stderr and "notes.txt" not in stdout + stderr
    assert "3 image(s) classified" in stderr and "1 skipped" in stderr


def test_classify_skips_every_unreadable_file(run_dir: Path, image_dir: Path) -> None:
    broken = image_dir / "broken.png"
    predictions, skipped = classify_images(load_run(run_dir), list_images([broken]))
    assert predictions == [] and [s.name for s in skipped] == [str(broken)]


def test_preprocessing_of_an_image_file_matches_the_training_pipeline(
    run_dir: Path, image_dir: Path
) -> None:
    """An 8x8 PNG of a digit, preprocessed for classify, is (up to 8-bit rounding) the tensor
    the DigitsDataModule trained and tested on."""
    run = load_run(run_dir)
    dm = instantiate(run.config.data)
    dm.setup("fit")
    assert run.preprocessing == Preprocessing.from_datamodule(dm)
    dataset = torch.cat([s.tensors[0] for s in (dm.train_set, dm.val_set, dm.test_set)])
    for path, _ in list_images([image_dir / "digit0_label0.png"]):
        x = run.preprocessing.load(path)
        closest = (dataset - x).abs().flatten(1).amax(1).min().item()
        assert closest < 0.05


def test_features_to_npy_with_names(run_dir: Path, image_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.npy"
    code, _, _ = run_tool("features.py", str(run_dir), str(image_dir), "-o", str(out))
    assert code == 0
    features = np.load(out)
    names = (tmp_path / "feats.names.txt").read_text().splitlines()
    assert names == sorted(p.name for p in image_dir.glob("digit*.png"))
    run = load_run(run_dir)  # in eval mode
    assert features.shape == (DIGITS, run.model.num_features)
    # The classifier's input: the model's classifier turns the written rows into its logits.
    x = torch.stack([run.preprocessing.load(image_dir / n) for n in names])
    with torch.no_grad():
        logits = run.model(x)
        from_features = run.model.get_classifier()(torch.from_numpy(features))
    torch.testing.assert_close(from_features, logits, rtol=1e-5, atol=1e-5)


def test_pooled_features_pass_through_the_head_conv() -> None:
    """GUNN-15's features come after its Conv1x1-BN-ReLU head (gunn_mini has none, so the run
    above cannot tell): the classifier applied to them must give the model's logits."""
    torch.manual_seed(0)
    model = create_model("gunn_mini", head_width=24, num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    features = pooled_features(model, x)
    assert features.shape == (2, 24)
    with torch.no_grad():
        torch.testing.assert_close(model.get_classifier()(features), model(x))


def test_finetune_digits_to_cifar10(
    run_dir: Path, cifar_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    with caplog.at_level(logging.INFO, logger="gunn_exp"):
        train_here(
            tmp_path, "model=gunn_mini", *cifar10_overrides(cifar_root), f"init_from={ckpt}",
            "debug=tiny",
        )  # fmt: skip
    assert f"init_from {ckpt}:" in caplog.text
    assert json.loads((tmp_path / "results.json").read_text())["data"] == "cifar10"
    assert json.loads((tmp_path / "classes.json").read_text())[0] == "class0"


def test_init_from_replaces_a_classifier_of_another_size(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    model = create_model("gunn_mini", num_classes=100)
    assert init_from_checkpoint(model, ckpt, "gunn_mini") == ["fc.bias", "fc.weight"]
    trained = load_run(run_dir).model.state_dict()
    tuned = model.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in trained.items() if not k.startswith("fc."))
    assert tuned["fc.weight"].shape == (100, model.num_features)


def test_init_from_refuses_another_backbone(run_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="backbone does not match model resnet18_cifar"):
        init_from_checkpoint(
            create_model("resnet18_cifar"), run_dir / "checkpoints" / "best.ckpt", "resnet18_cifar"
        )


def test_unusable_runs_and_checkpoints_are_refused(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="not a run directory"):
        find_checkpoint(tmp_path)
    # Alone, and without a description of its run inside: which model it holds is unknown.
    with pytest.raises(RunError, match="does not say which model it holds"):
        load_run(foreign_checkpoint(tmp_path / "alone.ckpt"))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_run(corrupt)


def test_a_run_without_classes_and_preprocessing_rebuilds_them(
    run_dir: Path, tmp_path: Path
) -> None:
    # An interrupted (or older) run has config.yaml and checkpoints only.
    bare = tmp_path / "bare"
    shutil.copytree(run_dir / "checkpoints", bare / "checkpoints")
    shutil.copy(run_dir / "config.yaml", bare)
    run, recorded = load_run(bare), load_run(run_dir)
    assert run.classes == recorded.classes
    assert run.preprocessing == recorded.preprocessing


def test_eval_of_another_runs_checkpoint_keeps_this_runs_own_results(
    run_dir: Path, tmp_path: Path
) -> None:
    """eval.py run_dir=A ckpt=<B's last.ckpt> wrote to A/eval/last, over A's own `ckpt=last`."""
    other = copy_run(run_dir, tmp_path / "other")
    evaluate(compose_config("eval", f"run_dir={run_dir}", "ckpt=last"))
    own = run_dir / "eval" / "last" / "results.json"
    written = own.read_bytes()
    ckpt = other / "checkpoints" / "last.ckpt"
    results = evaluate(compose_config("eval", f"run_dir={run_dir}", f"ckpt={ckpt}"))
    assert own.read_bytes() == written
    assert Path(results["output_dir"]).parent == run_dir / "eval"
    assert Path(results["output_dir"]).name.startswith("last_")


def test_report_reads_a_run_beside_its_eval_results(run_dir: Path, tmp_path: Path) -> None:
    """report.py over a run that eval.py evaluated: the eval results.json (one checkpoint, no
    training record) crashed it with KeyError 'params'."""
    evaluate(compose_config("eval", f"run_dir={run_dir}"))
    assert (run_dir / "eval" / "best" / "results.json").is_file()
    code, out, stderr = run_tool("report.py", str(run_dir), "--no-plot")
    assert code == 0, stderr
    assert "gunn_mini" in out
    code, _, stderr = run_tool("report.py", str(run_dir / "eval" / "best" / "results.json"))
    assert code == 2 and "is eval.py's result for one checkpoint" in stderr, stderr


def test_init_from_a_run_directory_reads_its_best_checkpoint(run_dir: Path) -> None:
    model = create_model("gunn_mini", num_classes=10)
    assert init_from_checkpoint(model, run_dir, "gunn_mini") == []
    trained = load_run(run_dir).model.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[key], msg=key)


def test_an_image_too_large_to_decode_is_skipped_by_name(run_dir: Path, tmp_path: Path) -> None:
    """PIL refuses images over twice its pixel limit (DecompressionBombError, not an OSError):
    that one is skipped, the others are classified."""
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("L", (8, 8)).save(folder / "small.png")
    Image.new("L", (64, 64)).save(folder / "huge.png")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000  # 64x64 is then over twice the limit
    try:
        predictions, skipped = classify_images(load_run(run_dir), list_images([folder]))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    assert [p.name for p in predictions] == ["small.png"]
    assert [s.name for s in skipped] == ["huge.png"]
