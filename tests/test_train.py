"""train.py end to end, as a user runs it: real subprocesses, real data formats, real run dirs
(runs whose entry point is not under test train in this process: conftest.train_here)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import RUN_ENV, cifar10_overrides, compose_train, exit_status, run_entry, train_here

from gunn_exp.training.train import train

TINY = ("debug=tiny", "trainer.max_epochs=2")
RESULT_KEYS = {"test_err1", "test_err5", "best_val_err1", "params", "epochs", "wall_time_s"}


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_digits_run_writes_the_run_directory(digits_run) -> None:
    stdout, run_dir = digits_run  # train.py experiment=digits debug=tiny (2 epochs), read-only
    for name in (
        "config.yaml",
        "metrics.csv",
        "curves.png",
        "results.json",
        "checkpoints/last.ckpt",
        "checkpoints/best.ckpt",
    ):
        assert (run_dir / name).is_file(), name
    assert [p.name for p in run_dir.rglob("*.csv")] == ["metrics.csv"]  # one table per run
    results = json.loads((run_dir / "results.json").read_text())
    assert results.keys() >= RESULT_KEYS
    assert results["model"] == "gunn_mini" and results["data"] == "digits"
    assert results["epochs"] == 2 and results["params"] > 0
    assert 0 <= results["test_err1"] <= 100 and results["test_err5"] <= results["test_err1"]
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert results["best_val_err1"] == pytest.approx(
        min(float(r["val/err1"]) for r in rows), abs=1e-4
    )
    # The run's log (stdout) ends by summarising its numbers.
    tail = stdout.strip().splitlines()[-4:]
    assert any("test  top-1 error" in line for line in tail), tail
    assert any(str(run_dir) in line for line in tail), tail


def test_results_do_not_depend_on_the_callbacks(tmp_path: Path) -> None:
    """callbacks=none (no ModelCheckpoint) still reports the best validation error: the module
    tracks it (val/err1_best), and the sweeper's objective is that metric. The per-epoch record
    is the run's, not a callback's: metrics.csv and curves.png are written all the same."""
    cfg = compose_train(
        "experiment=digits", *TINY, "callbacks=none", "print_config=false", output_dir=tmp_path
    )
    results = train(cfg)
    assert cfg.optimized_metric == "val/err1_best"
    best, final = results["best_val_err1"], results["final_val_err1"]
    assert best is not None and final is not None and best <= final
    assert results["best_val_epoch"] in (1, 2)
    assert results["metrics"][cfg.optimized_metric] == pytest.approx(best)
    assert json.loads((tmp_path / "results.json").read_text())["best_val_err1"] == best
    rows = read_metrics(tmp_path)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["val/err1"]) == pytest.approx(final)
    assert (tmp_path / "curves.png").is_file()


def test_seeded_cpu_runs_are_reproducible(tmp_path: Path) -> None:
    train_here(tmp_path / "a", "experiment=digits", *TINY, "seed=3")
    train_here(tmp_path / "b", "experiment=digits", *TINY, "seed=3")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "a")) == strip(read_metrics(tmp_path / "b"))


def test_cifar_format_folder_trains(tmp_path: Path, cifar_root: Path) -> None:
    # data.on_device=true (the GPU fast path) is trained, stopped and resumed in test_resume.
    results = train_here(tmp_path, "model=gunn_mini", *cifar10_overrides(cifar_root), *TINY)
    assert results["data"] == "cifar10" and results["epochs"] == 2


@pytest.mark.parametrize("data", ["cifar10", "cifar100", "imagenet"])
def test_missing_data_fails_early_with_the_fix(tmp_path: Path, data: str) -> None:
    # In this process: train.py's route from a data error to exit 2 is test_bad_input's.
    run_dir = tmp_path / "run"
    code, message = exit_status(
        lambda: train_here(
            run_dir,
            f"data={data}",
            "model=gunn_mini",
            f"paths.data_dir={tmp_path / 'nothing'}",
            "data.download=false" if data != "imagenet" else "data.ten_crop=false",
            *TINY,
        )
    )
    assert code == 2
    assert str(tmp_path / "nothing") in message and "Fix:" in message, message[-2000:]
    assert not (run_dir / "checkpoints").exists()


def test_the_console_carries_no_library_noise(tmp_path: Path) -> None:
    """cli.LIBRARY_NOISE: warnings libraries raise about each other stay off the user's console."""
    env = {k: v for k, v in RUN_ENV.items() if k != "PYTHONWARNINGS"}  # warnings as users see
    proc = run_entry(
        "train.py", "experiment=digits", "debug=fast_dev_run", "logger=[]", "print_config=false",
        f"hydra.run.dir={tmp_path / 'run'}", env=env,
    )  # fmt: skip
    assert "LeafSpec" not in proc.stderr, proc.stderr[-3000:]


def test_unknown_model_names_the_choices(run_train) -> None:
    proc, _ = run_train("model=gunn99", check=False)
    assert proc.returncode != 0
    assert "gunn99" in proc.stderr and "gunn15" in proc.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.batch_size=abc", "data.batch_size"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("model.update=sideways", "model.update"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
    ],
)
def test_bad_values_get_a_one_line_error(run_train, override: str, key: str) -> None:
    proc, _ = run_train("experiment=digits", override, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]
