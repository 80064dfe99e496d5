"""The results report and the sweep summary: over fake run directories with known numbers, and
over a real tiny ablation multirun driven through train.py and report.py."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from conftest import run_entry
from matplotlib.axes import Axes
from omegaconf import OmegaConf
from PIL import Image

from gunn_exp.analysis.report import (
    PAPER,
    SINGULARITY_STATS,
    convergence_table,
    group_key,
    load_runs,
    mean_curves,
    results_table,
    singularity_sites,
    singularity_table,
    write_report,
)
from gunn_exp.analysis.sweep_summary import SweepSummary
from gunn_exp.rundir.curves import curves_figure

CURVE_COLUMNS = ("epoch", "lr", "train/loss", "val/err1", "val/err5")


def fake_run(
    run_dir: Path, model: str, data: str, seed: int, err1: float, epochs: int = 4, **extra: object
) -> Path:
    """A finished run directory: results.json and a metrics.csv whose val/err1 is lowest at
    epoch 3 (err1 - 1) and whose train loss is 1/epoch + seed/10."""
    run_dir.mkdir(parents=True)
    rows = [
        {"epoch": e, "lr": 0.1, "train/loss": 1 / e + seed / 10,
         "val/err1": err1 - (1 if e == 3 else 0) + (epochs - e), "val/err5": 10.0 + e}
        for e in range(1, epochs + 1)
    ]  # fmt: skip
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    results = {
        "model": model, "data": data, "seed": seed, "params": 1_585_746, "epochs": epochs,
        "wall_time_s": 12.5, "test_err1": err1, "test_err5": err1 / 4, "best_val_err1": err1 - 1,
        "best_val_epoch": 3, "final_val_err1": err1, "final_val_err5": 11.0,
        "output_dir": "/elsewhere/moved", "tags": [], **extra,
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep of gunn15 on CIFAR-10 over seeds 0-2 (test errors 4, 5, 6), one digits run of
    gunn_mini, and one job that died before writing results.json."""
    root = tmp_path / "sweep"
    for seed, err in enumerate((4.0, 5.0, 6.0)):
        fake_run(root / f"{seed}_gunn15_cifar10", "gunn15", "cifar10", seed, err)
    fake_run(root / "3_gunn_mini_digits", "gunn_mini", "digits", 0, 9.0)
    (root / "4_gunn15_cifar10").mkdir()  # refused or killed before its run was accepted
    return root


def test_load_runs_finds_finished_runs_once(sweep: Path) -> None:
    runs = load_runs([sweep, sweep / "0_gunn15_cifar10", str(sweep / "*" / "results.json")])
    assert [(r["model"], r["seed"]) for r in runs] == [
        ("gunn15", 0), ("gunn15", 1), ("gunn15", 2), ("gunn_mini", 0),
    ]  # fmt: skip
    first = runs[0]
    assert first["run_dir"] == str((sweep / "0_gunn15_cifar10").resolve())  # where it is now
    assert [row["epoch"] for row in first["curve"]] == [1, 2, 3, 4]
    assert first["best_val_err5"] == 13.0  # top-5 at the best top-1 epoch (3)


def test_load_runs_rejects_a_path_that_matches_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        load_runs([tmp_path / "nope*"])


def test_results_table_gives_mean_std_n_and_the_paper(sweep: Path) -> None:
    table = results_table(load_runs([sweep]))
    lines = table.splitlines()
    assert lines[0].startswith("| model | data | epochs | n |")
    gunn15 = next(line for line in lines if line.startswith("| gunn15 "))
    cells = [c.strip() for c in gunn15.strip("|").split("|")]
    # final top-1 mean ± sample std over 3 seeds; best = final - 1; paper's 4.15; top-5s.
    assert cells == [
        "gunn15", "cifar10", "4", "3", "1.59M", "5.00 ± 1.00", "4.00 ± 1.00", "4.15",
        "1.25 ± 0.25", "13.00 ± 0.00", "—",
    ]  # fmt: skip
    mini = next(line for line in lines if line.startswith("| gunn_mini "))
    assert "| 1 |" in mini and "9.00" in mini and mini.count("—") == 2  # no paper numbers


def test_runs_of_different_lengths_are_not_averaged(tmp_path: Path) -> None:
    fake_run(tmp_path / "a", "gunn15", "cifar10", 0, 4.0, epochs=4)
    fake_run(tmp_path / "b", "gunn15", "cifar10", 0, 50.0, epochs=2)
    assert len(results_table(load_runs([tmp_path])).splitlines()) == 2 + 2  # header + 2 rows


def test_a_mean_over_fewer_runs_than_the_group_says_how_many(tmp_path: Path) -> None:
    """One of two seeds trained with test=false: the test mean is that of one run, not two."""
    fake_run(tmp_path / "a", "gunn15", "cifar10", 0, 4.0)
    fake_run(tmp_path / "b", "gunn15", "cifar10", 1, 6.0, test_err1=None, test_err5=None)
    row = results_table(load_runs([tmp_path])).splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "2" and cells[5] == "4.00 (n=1)" and cells[6] == "4.00 ± 1.41"


def test_convergence_table_and_mean_curves(sweep: Path) -> None:
    runs = [r for r in load_runs([sweep]) if r["model"] == "gunn15"]
    table = convergence_table(runs, fractions=(0.5, 1.0))
    loss = next(line for line in table.splitlines() if "train loss" in line)
    # epoch 2: 1/2 + seed/10 for seeds 0, 1, 2 -> 0.6 ± 0.1; epoch 4: 0.35 ± 0.1.
    assert "0.600 ± 0.100 (ep 2)" in loss and "0.350 ± 0.100 (ep 4)" in loss
    ((label, rows),) = mean_curves(runs).items()
    assert label == "gunn15 cifar10 (n=3)"
    assert rows[1]["train/loss"] == pytest.approx(0.6)


def test_write_report_files(sweep: Path, tmp_path: Path) -> None:
    runs = load_runs([sweep])
    files = write_report(runs, tmp_path / "out" / "r", title="Fake")
    assert [f.name for f in files] == ["r.md", "r.csv", "r.png"]
    markdown = files[0].read_text()
    assert markdown.startswith("# Fake") and "## Convergence" in markdown and "## Runs" in markdown
    with files[1].open() as f:
        table = list(csv.DictReader(f))
    assert [row["seed"] for row in table] == ["0", "1", "2", "0"]
    assert files[2].stat().st_size > 0


def epoch_ticks(ax: Axes) -> list[float]:
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


def test_curves_have_whole_epochs_and_a_log_scale_where_values_span_decades() -> None:
    """A 2-epoch resume (epochs 3, 4) and the demo's first val loss of 28 (later ones ~0.05)."""
    rows = [
        {"epoch": 3, "train/loss": 2.3, "val/loss": 28.0, "train/err1": 80.0, "val/err1": 90.0},
        {"epoch": 4, "train/loss": 0.4, "val/loss": 0.05, "train/err1": 0.0, "val/err1": 2.0},
    ]
    loss, err = curves_figure({"": rows}, "gunn_mini on digits, seed 0").axes
    assert epoch_ticks(loss) == [3, 4] and epoch_ticks(err) == [3, 4]
    assert loss.get_yscale() == "log"
    assert err.get_yscale() == "symlog"  # spans decades, and a training error reached 0%
    narrow = [{"epoch": 1, "val/err1": 5.0}, {"epoch": 2, "val/err1": 4.0}]
    assert curves_figure({"": narrow}).axes[1].get_yscale() == "linear"


def test_a_runs_curves_are_titled_with_model_data_and_seed(digits_run: tuple[str, Path]) -> None:
    with Image.open(digits_run[1] / "curves.png") as figure:
        assert figure.text["Title"] == "gunn_mini on digits, seed 0"


def test_paper_numbers_are_spec_section_4() -> None:
    assert PAPER[("gunn15", "cifar10")] == {"err1": 4.15}
    assert PAPER[("gunn24", "cifar100")] == {"err1": 16.69}
    assert PAPER[("wide_gunn18", "imagenet")] == {"err1": 20.59, "err5": 5.52}


def test_sweep_callback_summarises_and_names_missing_jobs(sweep: Path) -> None:
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    summary = (sweep / "summary.md").read_text()
    assert "4 of 5 jobs finished" in summary and "4_gunn15_cifar10" in summary
    assert (sweep / "summary.csv").is_file() and not (sweep / "summary.png").exists()


def test_report_cli(sweep: Path, tmp_path: Path) -> None:
    proc = run_entry("report.py", str(sweep), "--out", str(tmp_path / "rep"), "--title", "Mine")
    assert proc.stdout.startswith("# Mine") and "5.00 ± 1.00" in proc.stdout
    assert {p.name for p in tmp_path.glob("rep.*")} == {"rep.md", "rep.csv", "rep.png"}
    with Image.open(tmp_path / "rep.png") as figure:  # what the figure shows, in its title
        assert figure.text["Title"] == "Mine: gunn15, gunn_mini on cifar10, digits, seeds 0, 1, 2"
    missing = run_entry("report.py", str(tmp_path / "nothing"), check=False)
    assert missing.returncode == 2 and "matches no file" in missing.stderr


def test_tiny_ablation_multirun_end_to_end(tmp_path: Path) -> None:
    """experiment=ablation as `make ablation` runs it, shrunk: both models, one seed, 4 short
    epochs; the sweep summary appears, the lr follows the recipe, report.py plots the pair."""
    sweep = tmp_path / "ablation"
    run_entry(
        "train.py", "-m", "experiment=ablation", "debug=tiny", "trainer.max_epochs=4", "seed=0",
        "print_config=false", f"hydra.sweep.dir={sweep}", timeout=600,
    )  # fmt: skip
    runs = load_runs([sweep])
    assert [r["model"] for r in runs] == ["gunn_mini", "sunn_mini"]
    assert runs[0]["params"] == runs[1]["params"]  # the twins: same parameters
    for run in runs:
        # docs/SPEC.md §3's steps at 50% and 75% of the epochs, counted from 1.
        assert [row["lr"] for row in run["curve"]] == pytest.approx([0.1, 0.01, 0.001, 0.001])
    summary = (sweep / "summary.md").read_text()
    assert "2 of 2 jobs finished" in summary and "sunn_mini" in summary
    run_entry("report.py", str(sweep), "--out", str(sweep / "ablation"))
    assert (sweep / "ablation.png").stat().st_size > 0
    report = (sweep / "ablation.md").read_text()
    assert "| gunn_mini | digits | 4 | 1 |" in report and "| sunn_mini | digits | 4 | 1 |" in report


def add_probe_columns(run_dir: Path, site_values: dict[str, float]) -> None:
    """Append singularity columns to a fake run's metrics.csv: `<site>/<stat>` -> value + epoch/10
    for every statistic the report shows."""
    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for site, value in site_values.items():
            for stat in SINGULARITY_STATS:
                row[f"singularity/{site}/{stat}"] = value + int(row["epoch"]) / 10
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_gunn_vs_sunn_singularity_figure_and_table(tmp_path: Path) -> None:
    """Two groups (GUNN, SUNN) x 3 seeds with known statistics: the table averages the sites,
    then the seeds; the figure is written beside the report."""
    for model, base in (("gunn_mini", 0.2), ("sunn_mini", 0.5)):
        for seed in range(3):
            run = fake_run(tmp_path / f"{model}_{seed}", model, "digits", seed, 5.0)
            add_probe_columns(run, {"stages.0.gunn1": base + seed / 100, "stages.1.gunn1": base})
    runs = load_runs([tmp_path])
    assert singularity_sites(runs) == ["stages.0.gunn1", "stages.1.gunn1"]
    table = singularity_table(runs, fractions=(1.0,))
    gunn = next(line for line in table.splitlines() if "gunn_mini" in line and "mean abs" in line)
    # epoch 4: per run (0.2 + seed/100 + 0.4 + 0.2 + 0.4) / 2 = 0.6 + seed/200 -> 0.605 ± 0.005
    assert "0.605 ± 0.005 (ep 4)" in gunn
    files = write_report(runs, tmp_path / "out" / "r", title="GUNN vs SUNN")
    assert [f.name for f in files] == ["r.md", "r.csv", "r.png", "r_singularity.png"]
    assert files[3].stat().st_size > 0 and "## Singularity diagnostics" in files[0].read_text()


def test_gunnified_and_data_fraction_runs_are_their_own_groups(tmp_path: Path) -> None:
    gunnify = {"segments": 4, "mode": "exact", "blocks": None}
    fake_run(tmp_path / "a", "resnet_mini", "digits", 0, 4.0)
    fake_run(
        tmp_path / "b", "resnet_mini", "digits", 0, 5.0, gunnify={**gunnify, "update": "gradual"}
    )
    fake_run(
        tmp_path / "c",
        "resnet_mini",
        "digits",
        0,
        6.0,
        gunnify={**gunnify, "update": "simultaneous"},
    )
    fake_run(tmp_path / "d", "resnet_mini", "digits", 0, 7.0, train_fraction=0.1)
    labels = [group_key(r)[:2] for r in load_runs([tmp_path])]
    assert sorted(labels) == [
        ("resnet_mini", "digits"),
        ("resnet_mini", "digits (0.1 of train)"),
        ("resnet_mini+gunnify(K=4,gradual,exact)", "digits"),
        ("resnet_mini+gunnify(K=4,simultaneous,exact)", "digits"),
    ]


def test_a_grid_over_lr_and_seeds_is_one_group_per_lr(tmp_path: Path) -> None:
    """`hparams_search=lr_seed_grid`, from the command line and shrunk: each learning rate is a
    group over its seeds, labelled with the lr; what differs between the jobs anyway (seed, run
    directory, checkpoint paths) splits nothing, and nor does a speed-only key (num_workers)."""
    sweep = tmp_path / "grid"
    run_entry(
        "train.py", "-m", "experiment=digits", "debug=tiny", "trainer.max_epochs=1",
        "optimizer.lr=0.05,0.1", "seed=0,1", "print_config=false", f"hydra.sweep.dir={sweep}",
        timeout=600,
    )  # fmt: skip
    extra = sweep / "4_gunn_mini_digits"  # job 3 again, as if run later with 4 workers, seed 2
    shutil.copytree(sweep / "3_gunn_mini_digits", extra)
    config = OmegaConf.load(extra / "config.yaml")
    config.data.num_workers, config.seed = 4, 2
    OmegaConf.save(config, extra / "config.yaml")
    results = json.loads((extra / "results.json").read_text())
    (extra / "results.json").write_text(json.dumps({**results, "seed": 2}))
    runs = load_runs([sweep])
    groups = {}
    for run in runs:
        groups.setdefault(group_key(run)[0], []).append(run["seed"])
    assert groups == {
        "gunn_mini [optimizer.lr=0.05]": [0, 1],
        "gunn_mini [optimizer.lr=0.1]": [0, 1, 2],
    }
    table = (sweep / "summary.md").read_text()  # the sweep's own summary, 4 jobs
    assert "| gunn_mini [optimizer.lr=0.05] | digits | 1 | 2 |" in table
    assert "| gunn_mini [optimizer.lr=0.1] | digits | 1 | 2 |" in table
    with (sweep / "summary.csv").open() as f:
        assert {row["settings"] for row in csv.DictReader(f)} == {
            "optimizer.lr=0.05",
            "optimizer.lr=0.1",
        }
