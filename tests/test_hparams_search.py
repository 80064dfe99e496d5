"""Sweep configs: the Optuna search runs trials and minimises train.py's best validation error;
the grid and SLURM launcher configs compose to what they promise."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import compose_train, run_entry

from gunn_exp.training.schedules import register_resolvers

register_resolvers()


def test_optuna_search_minimises_the_best_validation_error(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    run_entry(
        "train.py",
        "hparams_search=gunn15_optuna",
        "experiment=digits",
        "debug=tiny",
        "print_config=false",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    )
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}
    errors = [
        yaml.safe_load((job / "results.json").read_text())["best_val_err1"]
        for job in sorted(sweep.glob("*_gunn_mini_digits"))
    ]
    assert len(errors) == 2 and best["best_value"] == min(errors)


def test_grid_config_sweeps_learning_rates_and_seeds() -> None:
    cfg = compose_train("hparams_search=lr_seed_grid", keep_hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert dict(cfg.hydra.sweeper.params) == {"optimizer.lr": "0.05,0.1,0.2", "seed": "0,1,2"}


def test_slurm_launcher_runs_one_task_per_gpu() -> None:
    cfg = compose_train(
        "hydra/launcher=slurm",
        "trainer=ddp_slurm",
        "trainer.num_nodes=2",
        "trainer.devices=8",
        keep_hydra=True,
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert cfg.trainer.strategy == "ddp"
