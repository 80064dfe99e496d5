"""DDP through Lightning with CPU processes (gloo): one run directory per run or multirun job,
one results.json, and the same numbers on every rank."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import ROOT, RUN_ENV, compose_train, run_entry
from hydra.core.hydra_config import HydraConfig

from gunn_exp.errors import ConfigError
from gunn_exp.training.launch import check_rank_run_dirs
from gunn_exp.training.schedules import register_resolvers

register_resolvers()

DDP = ("experiment=digits", "debug=tiny", "trainer=ddp_cpu", "print_config=false")
RANK_LINE = re.compile(r"rank (\d)/2 results: (\{.*\})")


def rank_results(log_file: Path) -> dict[int, dict[str, float]]:
    """Each rank's final numbers, from the run's log (every rank appends to it)."""
    found = [RANK_LINE.search(line) for line in log_file.read_text().splitlines()]
    ranks = [(int(m[1]), json.loads(m[2])) for m in found if m]
    assert len(ranks) == len({rank for rank, _ in ranks}), "a rank ran twice"
    return dict(ranks)


def assert_one_ddp_run(run_dir: Path) -> None:
    """Both ranks wrote into `run_dir`, agree, and agree with its results.json."""
    ranks = rank_results(run_dir / "debug.log")
    assert sorted(ranks) == [0, 1]
    assert ranks[0] == ranks[1]
    saved = json.loads((run_dir / "results.json").read_text())
    assert {k: saved[k] for k in ranks[0]} == ranks[0]


def test_ddp_inside_multirun_runs_each_job_once(tmp_path: Path) -> None:
    """Each job of a DDP multirun runs as a single DDP run (`train.py <job overrides>
    hydra.run.dir=<job dir>`, launch.run_job_as_single_run), so this also checks a single DDP run:
    one run directory, one results.json, equal ranks."""
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py", "-m", *DDP, "trainer.max_epochs=1", "seed=1,2", f"hydra.sweep.dir={sweep}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["sweep"]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0_gunn_mini_digits", "1_gunn_mini_digits"]
    for job in jobs:
        assert len(list(job.rglob("results.json"))) == 1
        assert_one_ddp_run(job)
    seeds = [json.loads((job / "results.json").read_text())["seed"] for job in jobs]
    assert seeds == [1, 2]


@pytest.fixture
def torchrun_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives rank 0 of 2 (ranks started outside Lightning)."""
    env = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("run_dir", [None, "hydra.run.dir=/shared/run"])
def test_ranks_started_outside_lightning_need_one_run_dir(torchrun_rank, run_dir: str | None):
    compose_train(*([run_dir] if run_dir else []), keep_hydra=True)  # sets HydraConfig
    try:
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
        if run_dir:
            check_rank_run_dirs(trainer)
        else:
            with pytest.raises(ConfigError, match="hydra.run.dir="):
                check_rank_run_dirs(trainer)
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_torchrun_ranks_share_the_given_run_dir(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            str(ROOT / "train.py"),
            *DDP,
            f"hydra.run.dir={run_dir}",
        ],
        cwd=ROOT,
        env=RUN_ENV,
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert_one_ddp_run(run_dir)
