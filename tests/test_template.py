"""lightning-hydra-template's test scenarios, driving our entry points as its users would:
fast_dev_run, a double validation loop, resume, train-then-eval by checkpoint path, every
experiment config under fast_dev_run, Hydra and Optuna sweeps with and without DDP, and the same
with wandb offline. The slow ones run with `make test-slow`. Fast ones whose script is not what
they check train in this process (conftest.train_here); train-then-eval runs eval.py itself."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    ROOT,
    RUN_ENV,
    compose_config,
    compose_train,
    copy_run,
    exit_status,
    run_entry,
    train_here,
    write_cifar,
)
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image
from pytorch_lightning.accelerators import CPUAccelerator
from wandb_records import read_offline_run

from gunn_exp import rundir
from gunn_exp.config import validate_config
from gunn_exp.rundir.configs import config_history
from gunn_exp.training.train import train

TINY = ("experiment=digits", "debug=tiny", "print_config=false")
WANDB_OFFLINE = {**RUN_ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / rundir.RESULTS).read_text())


def train_entry(*overrides: str, env: dict[str, str] | None = None, check: bool = True,
                timeout: int = 600) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """train.py with RUN_ENV, or `env` (e.g. wandb offline)."""
    if env is None:
        return run_entry("train.py", *overrides, check=check, timeout=timeout)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# --- fast ---------------------------------------------------------------------------------------


def test_train_fast_dev_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    train_here(run_dir, "experiment=digits", "debug=fast_dev_run", "logger=[]")  # no logger
    saved = results(run_dir)
    assert saved["epochs"] == 1 and saved["test_err1"] is not None
    assert not (run_dir / "checkpoints").exists()  # fast_dev_run writes no checkpoint


def test_train_then_eval_by_checkpoint_path(digits_run, tmp_path: Path) -> None:
    # The session's `train.py experiment=digits debug=tiny` run (2 epochs); eval writes into it.
    run_dir = copy_run(digits_run[1], tmp_path / "run")
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    # No run_dir: found from the checkpoint's place. The 2 test batches debug=tiny tested.
    # With the template's eval.yaml keys as its users type them.
    template_keys = ("task_name=eval_check", "tags=[cifar,recheck]", "seed=3",
                     "extras.print_config=true", "extras.ignore_warnings=true")  # fmt: skip
    proc = run_entry("eval.py", f"ckpt_path={last}", "limit_batches=2", *template_keys)
    assert "top-1 error" in proc.stdout + proc.stderr
    assert "ckpt_path" in proc.stdout and "tags" in proc.stdout  # the config tree
    evaluated = json.loads((run_dir / "eval" / "last_first2" / rundir.RESULTS).read_text())
    assert evaluated["checkpoint"] == str(last) and evaluated["run_dir"] == str(run_dir)
    assert (evaluated["task_name"], evaluated["tags"]) == ("eval_check", ["cifar", "recheck"])
    assert evaluated["images"] == 128 and evaluated["epoch"] == 2  # 2 batches of 64, epoch 2
    # last.ckpt holds the final weights, which train.py tested on the same test batches.
    trained = results(run_dir)
    assert evaluated["err1"] == pytest.approx(trained["test_err1"], abs=1e-3)
    assert evaluated["err5"] == pytest.approx(trained["test_err5"], abs=1e-3)


def test_eval_without_run_dir_or_ckpt_path_names_both(tmp_path: Path) -> None:
    from gunn_exp.errors import ConfigError
    from gunn_exp.inference.evaluate import evaluate

    cfg = compose_config("eval", output_dir=tmp_path)
    with pytest.raises(ConfigError, match="run_dir=<run directory>.* or ckpt_path=<file.ckpt>"):
        evaluate(cfg)


# A job of `train.py -m data=digits model=gunn_mini debug=tiny seed=1,2`, run in this process
# (`-m` is Hydra's multirun mode; real multiruns: the slow sweep tests below, test_ddp).
MULTIRUN_JOB = ("data=digits", "model=gunn_mini", "debug=tiny", "seed=1", "hydra.mode=MULTIRUN")


@pytest.fixture
def single_run_after():
    """HydraConfig back to a single run for the tests that follow a multirun job."""
    yield
    compose_train()


@pytest.mark.usefixtures("single_run_after")
def test_multirun_without_tags_stops_with_a_hint(tmp_path: Path) -> None:
    code, stderr = exit_status(lambda: train_here(tmp_path / "0", *MULTIRUN_JOB, "tags=[]"))
    assert code == 2
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "tags=[] in a multirun" in lines[0], stderr[-2000:]
    assert "tags=[" in lines[0] and "extras.enforce_tags=false" in lines[0]
    assert not list(tmp_path.rglob(rundir.RESULTS))


@pytest.mark.usefixtures("single_run_after")
def test_multirun_with_the_default_tags_and_no_logger_runs(tmp_path: Path) -> None:
    """lightning-hydra-template's rule (enforce_tags refuses only missing tags): its sweep tests
    run with the default `tags: ["dev"]`; and `logger=[]`, no logger at all, in a multirun."""
    assert train_here(tmp_path / "0", *MULTIRUN_JOB, "logger=[]")["tags"] == ["dev"]
    assert results(tmp_path / "0")["epochs"] == 2


def test_template_extras_switches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`extras.enforce_tags=false` lets a [dev]-tagged sweep run; `extras.print_config=false` drops
    the config tree; `extras.ignore_warnings=true` silences Python warnings. A job of `train.py -m
    data=digits model=gunn_mini ...`, in this process: here a warning would be seen (a subprocess
    runs with PYTHONWARNINGS=ignore), and train(cfg) is where all three switches act."""
    cfg = compose_train(
        "data=digits", "model=gunn_mini", "debug=tiny", "seed=1", "trainer.max_epochs=1",
        "extras.enforce_tags=false", "extras.print_config=false", "extras.ignore_warnings=true",
        "hydra.mode=MULTIRUN", output_dir=tmp_path / "sweep" / "0",
    )  # fmt: skip
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every warning recorded, unless train() silences it
            train(cfg)
    finally:
        compose_train()  # HydraConfig back to a single run for the tests that follow
    assert len(list(tmp_path.rglob(rundir.RESULTS))) == 1
    assert "optimizer" not in capsys.readouterr().out  # no config tree
    assert not caught, [str(w.message) for w in caught]


def template_compose(name: str, tmp_path: Path, *overrides: str) -> DictConfig:
    """A config as lightning-hydra-template's tests/conftest.py builds it: composed with
    `return_hydra_config=True` (the `hydra` node stays in), set as Hydra's config of a single
    run, then edited under open_dict."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.trainer.max_epochs = 1
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.logger = None
    HydraConfig().set_config(cfg)
    return cfg


def test_template_conftest_config_trains_then_evaluates(tmp_path: Path) -> None:
    """The template's test_train_fast_dev_run and test_train_eval on configs composed its way."""
    from gunn_exp.inference.evaluate import evaluate

    cfg_train = template_compose("train", tmp_path, "experiment=digits", "debug=tiny")
    with open_dict(cfg_train):
        cfg_train.extras.print_config = False
        cfg_train.extras.enforce_tags = False
    trained = train(cfg_train)
    assert "last.ckpt" in [p.name for p in (tmp_path / "checkpoints").iterdir()]
    cfg_eval = template_compose("eval", tmp_path / "eval", "ckpt_path=.")
    with open_dict(cfg_eval):
        cfg_eval.extras.print_config = False  # as the template's cfg_eval fixture sets them
        cfg_eval.extras.enforce_tags = False
        cfg_eval.trainer.limit_test_batches = 2  # the 2 test batches debug=tiny tested
        cfg_eval.ckpt_path = str(tmp_path / "checkpoints" / "last.ckpt")
    evaluated = evaluate(cfg_eval)
    assert evaluated["images"] == 128 and evaluated["err1"] == pytest.approx(trained["test_err1"])


def test_train_ddp_sim_the_templates_way(tmp_path: Path) -> None:
    """The template's test_train_ddp_sim: train(cfg) from Python with ddp_spawn on 2 CPU
    processes. It trains as ddp in a fresh train.py process (launch.py: Lightning's launcher
    would re-run pytest's command line), and results.json describes the trained run."""
    cfg = template_compose("train", tmp_path, "experiment=digits", "debug=tiny")
    with open_dict(cfg):
        cfg.extras.print_config = False
        cfg.trainer.max_epochs = 2
        cfg.trainer.devices = 2
        cfg.trainer.strategy = "ddp_spawn"
    returned = train(cfg)
    saved = results(tmp_path)
    assert returned == saved
    assert saved["epochs"] == 2 and saved["test_err1"] is not None
    assert saved["best_val_epoch"] in (1, 2) and saved["final_val_err1"] is not None
    assert OmegaConf.load(tmp_path / "config.yaml").trainer.strategy == "ddp"  # what ran
    assert "ddp_spawn" in OmegaConf.to_yaml(cfg)  # the caller's config is left as it was


def test_eval_composes_a_trainer_like_the_templates_eval_yaml() -> None:
    """`eval.py trainer=gpu | trainer.devices=... | +trainer.precision=...`: the train.py group."""
    cfg = compose_config("eval", "ckpt_path=x.ckpt", "trainer=cpu", "+trainer.precision=bf16-mixed")
    assert cfg.trainer == compose_train("trainer=cpu", "+trainer.precision=bf16-mixed").trainer
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.precision == "bf16-mixed" and isinstance(trainer.accelerator, CPUAccelerator)
    gpu = compose_config("eval", "ckpt_path=x.ckpt", "trainer=gpu", "trainer.devices=[1]")
    assert (gpu.trainer.accelerator, list(gpu.trainer.devices)) == ("gpu", [1])


def test_readme_lightning_tricks_work_verbatim() -> None:
    """The template README's `+trainer.` commands: our trainer default has only its keys."""
    tricks = ("+trainer.gradient_clip_val=0.5", "+trainer.val_check_interval=0.25",
              "+trainer.accumulate_grad_batches=2", '+trainer.max_time="00:12:00:00"')  # fmt: skip
    cfg = compose_train("experiment=digits", *tricks)
    validate_config(cfg)
    trainer = instantiate(cfg.trainer, logger=False)
    assert (trainer.gradient_clip_val, trainer.val_check_interval) == (0.5, 0.25)
    assert trainer.accumulate_grad_batches == 2
    (timer,) = [c for c in trainer.callbacks if type(c).__name__ == "Timer"]
    assert timer._duration == 12 * 3600


def test_resume_with_a_longer_run_proceeds_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The template's resume test: 1 epoch, then `trainer.max_epochs=2 ckpt_path=last`."""
    run_dir = tmp_path / "run"
    train_here(run_dir, *TINY, "trainer.max_epochs=1")
    with caplog.at_level("WARNING", logger="gunn_exp"):
        resumed = train_here(run_dir, *TINY, "trainer.max_epochs=2", "ckpt_path=last")
    (line,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.endswith("trainer.max_epochs 1 -> 2; CosineAnnealingLR lr over 1 -> 2 epochs")
    assert resumed["epochs"] == 2
    assert [r["epoch"] for r in rundir.read_metrics(run_dir / rundir.METRICS)] == [1.0, 2.0]
    history = [OmegaConf.load(p).trainer.max_epochs for p in config_history(run_dir)]
    assert history == [1, 2]  # config.yaml, then config.resume-1.yaml


# --- slow: the rest of the template's scenarios --------------------------------------------------


@pytest.mark.slow
def test_train_double_val_loop(run_train) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = run_train(*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=4",
                           "+trainer.val_check_interval=0.5", "logger=tensorboard")  # fmt: skip
    events = EventAccumulator(str(run_dir / "tensorboard"))  # every validation, by step
    events.Reload()
    assert len(events.Scalars("val/err1")) == 2  # twice in the one epoch
    assert [r["epoch"] for r in rundir.read_metrics(run_dir / rundir.METRICS)] == [1.0]


@pytest.mark.slow
def test_train_resume(run_train) -> None:
    proc, run_dir = run_train(*TINY, "trainer.max_epochs=1")
    assert "resuming from" not in proc.stderr + proc.stdout
    proc, _ = run_train(*TINY, "trainer.max_epochs=2", "ckpt_path=last")
    assert "resuming from" in proc.stderr + proc.stdout
    assert [r["epoch"] for r in rundir.read_metrics(run_dir / rundir.METRICS)] == [1.0, 2.0]
    assert results(run_dir)["epochs"] == 2


@pytest.mark.slow
def test_test_switch_and_test_only_run(run_train, tmp_path: Path) -> None:
    _, run_dir = run_train(*TINY, "trainer.max_epochs=1", "test=false")
    untested = results(run_dir)
    assert untested["test_err1"] is None and untested["best_val_err1"] is not None
    last = rundir.checkpoint_path(run_dir, rundir.LAST)
    _, test_dir = run_train(*TINY, "train=false", f"ckpt_path={last}", run_dir=tmp_path / "test")
    tested = results(test_dir)
    assert tested["test_err1"] is not None and tested["ckpt_path"] == str(last)
    assert not rundir.checkpoint_path(test_dir, rundir.LAST).exists()  # nothing trained


def write_imagenet(root: Path, classes: int = 3, per_class: int = 4) -> Path:
    """A tiny ILSVRC-2012-style tree of real JPEG files: train/<wnid>/, val/<wnid>/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / "imagenet" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def generated_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return write_imagenet(root)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(run_train, generated_data: Path, experiment: str) -> None:
    data = [] if experiment in ("digits", "ablation") else [
        f"paths.data_dir={generated_data}", "data.num_workers=0", "data.batch_size=2"
    ]  # fmt: skip
    if "cifar" in experiment:
        data += ["data.download=false", "data.verify_checksums=false"]
    if "imagenet" in experiment:
        data += ["data.num_classes=3"]  # the generated tree's classes
    _, run_dir = run_train(f"experiment={experiment}", "debug=fast_dev_run", *data)
    saved = results(run_dir)
    assert saved["epochs"] == 1 and saved["test_err1"] is not None


def sweep_jobs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.glob("*/results.json"))


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True], ids=["single", "ddp_cpu"])
def test_hydra_sweep(tmp_path: Path, ddp: bool) -> None:
    sweep = tmp_path / "sweep"
    train_entry("-m", *TINY, "trainer.max_epochs=1", "seed=1,2", "tags=[sweep_test]",
                *(["trainer=ddp_cpu"] if ddp else []), f"hydra.sweep.dir={sweep}")  # fmt: skip
    jobs = sweep_jobs(sweep)
    assert [results(j)["seed"] for j in jobs] == [1, 2]
    assert all(results(j)["tags"] == ["sweep_test"] for j in jobs)
    assert (sweep / "summary.md").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True], ids=["single", "ddp_cpu"])
def test_optuna_sweep(tmp_path: Path, ddp: bool) -> None:
    sweep = tmp_path / "sweep"
    train_entry("hparams_search=gunn15_optuna", *TINY, "trainer.max_epochs=1",
                "hydra.sweeper.n_trials=2", *(["trainer=ddp_cpu"] if ddp else []),
                f"hydra.sweep.dir={sweep}")  # fmt: skip
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    errors = [results(j)["best_val_err1"] for j in sweep_jobs(sweep)]
    assert len(errors) == 2 and best["best_value"] == min(errors)


@pytest.mark.slow
@pytest.mark.parametrize("ddp", [False, True], ids=["single", "ddp_cpu"])
def test_sweeps_with_wandb_offline(tmp_path: Path, ddp: bool) -> None:
    """A Hydra sweep and an Optuna sweep with logger=wandb: one offline wandb run per job, all in
    the sweep's group, each holding its job's config and metrics."""
    extra = ["trainer=ddp_cpu"] if ddp else []
    for sweep, args in (
        (tmp_path / "grid", ["-m", "seed=1,2", "tags=[wandb_sweep]"]),  # -m before overrides
        (tmp_path / "optuna", ["hparams_search=gunn15_optuna", "hydra.sweeper.n_trials=2"]),
    ):
        train_entry(*args, *TINY, *extra, "logger=wandb", "trainer.max_epochs=1",
                    f"hydra.sweep.dir={sweep}", env=WANDB_OFFLINE)  # fmt: skip
        jobs = sweep_jobs(sweep)
        assert len(jobs) == 2
        for job in jobs:
            (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
            run = read_offline_run(run_file)
            assert run.group == sweep.name
            job_config = yaml.safe_load((job / rundir.CONFIG).read_text())
            assert run.config["optimizer/lr"] == job_config["optimizer"]["lr"]
            assert run.config["seed"] == results(job)["seed"]
            assert any("val/err1" in row for row in run.history)
            assert run.summary["params"] == results(job)["params"]


@pytest.mark.parametrize("batch_size", [8, 32])
def test_datamodule_the_templates_way(batch_size: int) -> None:
    """The template's test_mnist_datamodule on ours: built from keyword arguments alone (the
    class count is the dataset's), splits under its names, empty until setup, all images in the
    three splits, batches of float images and int64 labels."""
    import torch

    from gunn_exp.data import CIFARDataModule, DigitsDataModule

    dm = DigitsDataModule(batch_size=batch_size)
    assert dm.num_classes == 10 and CIFARDataModule(name="cifar100").num_classes == 100
    dm.prepare_data()
    assert not dm.data_train and not dm.data_val and not dm.data_test
    dm.setup()
    assert dm.data_train and dm.data_val and dm.data_test
    assert dm.train_dataloader() and dm.val_dataloader() and dm.test_dataloader()
    assert len(dm.data_train) + len(dm.data_val) + len(dm.data_test) == 1797
    x, y = next(iter(dm.train_dataloader()))
    assert len(x) == len(y) == batch_size
    assert x.dtype == torch.float32 and y.dtype == torch.int64
