"""`hydra/launcher=ray`: a sweep's jobs as Ray tasks, driven through train.py as a user runs it.

Fast: the refusals before any job starts (Ray missing, a cluster address nothing answers at, jobs
that cannot be one Ray task, resources no job fits in), and a job's exit becoming its line.
Slow (a local Ray instance, ~5 s to start, sized for 2 cores): a packed job equals its solo run
bit for bit, a stopped sweep resumes exactly and keeps its finished jobs, a failed job is listed
while the others finish on their share of a (fake) GPU, Optuna runs trials at once into one
SQLite study, and a sweep joins a Ray instance it did not start, as it would a cluster.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, RUN_ENV, compose_train, run_entry, run_tool
from omegaconf import OmegaConf
from wandb_records import read_offline_run

from gunn_exp import cli, rundir
from gunn_exp.errors import ConfigError
from gunn_exp.launchers.ray_checks import check_job, check_resources
from gunn_exp.launchers.ray_task import exit_line
from gunn_exp.rundir.checkpoint import load_checkpoint

RAY_ENV = {**RUN_ENV, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
# Tests that start Ray or reach for a cluster need the `ray` extra; the rest run without it.
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None
    or importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None,
    reason='needs the ray extra (pip install -e ".[ray]")',
)
TINY = ("experiment=digits", "debug=tiny", "print_config=false")
SWEEP = (*TINY, "tags=[ray_test]")


def ray_train(
    *overrides: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """`python train.py <overrides>` (from the repo root); stdout and stderr in one stream, where
    Ray's forwarded job lines and the driver's lines interleave as on a console."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env or RAY_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def ray_local() -> Iterator[tuple[str, ...]]:
    """Overrides for a local Ray instance on 2 CPUs with a small object store, in a short temp
    directory (Ray's socket paths must fit in 107 bytes), removed afterwards."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield (
        "hydra/launcher=ray",
        "hydra.launcher.ray.init.num_cpus=2",
        "hydra.launcher.ray.init.object_store_memory=78643200",
        f"+hydra.launcher.ray.init._temp_dir={temp}",
    )
    shutil.rmtree(temp, ignore_errors=True)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- fast: refused before any job starts ---------------------------------------------------------


def test_without_ray_installed_the_sweep_stops_in_one_line(tmp_path: Path) -> None:
    shadow = tmp_path / "site" / "ray"  # an importable `ray` that fails as a missing one does
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\")\n")
    env = {**RAY_ENV, "PYTHONPATH": os.pathsep.join([str(shadow.parent), RAY_ENV["PYTHONPATH"]])}
    sweep = tmp_path / "sweep"
    proc = ray_train(
        "-m", "hydra/launcher=ray", *SWEEP, "seed=1,2", f"hydra.sweep.dir={sweep}", env=env
    )
    assert proc.returncode == 2, proc.stdout[-3000:]
    (line,) = error_lines(proc.stdout)
    assert "hydra/launcher=ray needs Ray" in line and 'pip install -e ".[ray]"' in line
    assert job_dirs(sweep) == []


@needs_ray
def test_a_cluster_address_nothing_answers_at_stops_in_one_line(tmp_path: Path) -> None:
    """Ray itself retries such an address for minutes; the sweep stops at once, naming it."""
    address = f"127.0.0.1:{closed_port()}"
    sweep = tmp_path / "sweep"
    proc = ray_train(
        "-m",
        "hydra/launcher=ray",
        f"hydra.launcher.ray.init.address={address}",
        *SWEEP,
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout[-3000:]
    (line,) = error_lines(proc.stdout)
    assert f"hydra.launcher.ray.init.address={address}: no Ray cluster answers" in line
    assert "ray start --head" in line
    assert job_dirs(sweep) == []


@pytest.mark.parametrize(
    ("overrides", "num_gpus", "message"),
    [
        (["trainer=ddp_cpu"], 0, "trainer.strategy=ddp with trainer.devices=2"),
        (["trainer.devices=2"], 0, "a job of hydra/launcher=ray is one process on one device"),
        (["trainer.accelerator=gpu"], 0, "remote.num_gpus=0: the jobs would get no GPU"),
        ([], 2, "remote.num_gpus=2: a job trains on one device"),
    ],
    ids=["ddp", "two_devices", "gpu_without_share", "two_gpus"],
)
def test_jobs_that_cannot_be_one_ray_task_are_refused(
    overrides: list[str], num_gpus: float, message: str
) -> None:
    cfg = compose_train(*TINY, *overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_job(cfg, OmegaConf.create({"num_cpus": 1, "num_gpus": num_gpus}))


def test_resources_no_job_fits_in_are_refused_on_a_local_instance(caplog) -> None:
    remote = OmegaConf.create({"num_cpus": 4, "num_gpus": 0})
    with pytest.raises(ConfigError, match="needs 4 CPU and 0 GPU .* has 2 CPU and 0 GPU"):
        check_resources({"CPU": 2.0}, remote, {"cpu"}, local=True)
    with caplog.at_level(logging.WARNING):  # a cluster may grow: a warning only
        check_resources({"CPU": 2.0}, remote, {"cpu"}, local=False)
    assert "no job could start until nodes that have them join" in caplog.text
    idle = OmegaConf.create({"num_cpus": 1, "num_gpus": 0})
    with pytest.raises(ConfigError, match="has 8 GPU.*num_gpus=0 gives the jobs none"):
        check_resources({"CPU": 64.0, "GPU": 8.0}, idle, {"auto"}, local=True)
    check_resources({"CPU": 64.0, "GPU": 8.0}, idle, {"cpu"}, local=True)  # CPU jobs on purpose


def test_a_jobs_exit_becomes_its_line() -> None:
    """train.py ends an error with sys.exit inside cli.exits_on_error; inside a Ray task that
    exit would reach the driver as a crashed worker, so the task reports the printed line."""
    with pytest.raises(SystemExit) as stop, cli.exits_on_error():
        raise ConfigError("optimizer.lr=-1 is invalid")
    assert exit_line(stop.value) == "error: optimizer.lr=-1 is invalid"
    assert exit_line(SystemExit(3)) == "exited with status 3"


# --- slow: a local Ray instance ------------------------------------------------------------------


def results(run_dir: Path) -> dict:
    return rundir.read_results(run_dir / rundir.RESULTS)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(rundir.checkpoint_path(run_dir, rundir.LAST))["state_dict"]


def learned(run_dir: Path) -> dict[str, float]:
    """results.json's metrics but the clock readings, which no run repeats (`perf/` speeds,
    `*_time_s`)."""
    metrics = results(run_dir)["metrics"].items()
    return {k: v for k, v in metrics if not (k.startswith("perf/") or k.endswith("_time_s"))}


def assert_same_run(run: Path, solo: Path) -> None:
    """Bit for bit: every learned metric of results.json and every tensor of the final weights."""
    metrics = learned(run)
    assert metrics == learned(solo) and {"train/loss", "val/err1", "test/err1"} <= metrics.keys()
    weights, expected = final_weights(run), final_weights(solo)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def kept_files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """What a finished run is judged and resumed by, with modification times."""
    files = [rundir.RESULTS, rundir.METRICS, rundir.CONFIG, rundir.CURVES]
    paths = [run_dir / f for f in files] + sorted((run_dir / rundir.CHECKPOINTS).iterdir())
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


@pytest.mark.slow
@needs_ray
def test_packed_jobs_are_their_solo_runs_and_a_stopped_sweep_resumes_exactly(
    tmp_path: Path, ray_local: tuple[str, ...]
) -> None:
    """Three copies of one run, two at a time on one CPU each: #0 runs through, #1 is stopped by
    SIGTERM mid-epoch (it checkpoints), #2 is killed (SIGKILL: a lost node). The sweep lists
    both and exits 1; #0 equals the run trained alone with the basic launcher. Run again with
    the same sweep directory and ckpt_path=auto, #0 is left as it is and #1, #2 resume to that
    same run exactly; the sweep summary and report.py read the sweep as any multirun's."""
    run = (
        *SWEEP,
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=4",
        "ckpt_path=auto",
    )
    solo = tmp_path / "solo"
    run_entry("train.py", *run, f"hydra.run.dir={solo}")
    sweep = tmp_path / "sweep"
    faults = (
        "+callbacks.signal_at._target_=signal_at.SignalAt",
        "+callbacks.signal_at.batch=1",
        "+callbacks.signal_at.signum=0,15,9",
    )  # 0 sends nothing

    first = ray_train(
        "-m", *ray_local, *run, *faults, "+callbacks.signal_at.epoch=1", f"hydra.sweep.dir={sweep}"
    )
    assert first.returncode == 1, first.stdout[-4000:]
    finished, stopped, killed = job_dirs(sweep)
    report = first.stdout[first.stdout.index("2 of 3 jobs failed") :]
    for job, why in (
        (stopped, r"#1 \S+signum=15 \({}\): stopped: "),
        (killed, r"#2 \S+signum=9 \({}\): its process died"),
    ):
        assert re.search(why.format(re.escape(str(job))), report), report
    assert f"run the same command with hydra.sweep.dir={sweep} ckpt_path=auto" in report
    assert_same_run(finished, solo)
    (log,) = finished.glob("*.log")
    assert "ray: 1 CPU (1 torch threads), GPU none\n" in log.read_text()  # no GPU share
    for job in (stopped, killed):
        assert rundir.checkpoint_path(job, rundir.LAST).is_file()
        assert not (job / rundir.RESULTS).exists()

    kept = kept_files(finished)
    again = ray_train(
        "-m", *ray_local, *run, *faults, "+callbacks.signal_at.epoch=99", f"hydra.sweep.dir={sweep}"
    )  # the faults do not recur
    assert again.returncode == 0, again.stdout[-4000:]
    assert kept_files(finished) == kept
    for job in (stopped, killed):
        assert_same_run(job, solo)
    assert "3 of 3 jobs finished." in (sweep / "summary.md").read_text()
    code, out, _ = run_tool("report.py", str(sweep), "--no-plot")
    assert code == 0 and re.search(r"\| gunn_mini \| digits \| 3 \| 3 \|", out), out


@pytest.mark.slow
@needs_ray
def test_ctrl_c_stops_the_running_jobs_at_a_checkpoint(
    tmp_path: Path, ray_local: tuple[str, ...]
) -> None:
    """Ctrl-C in the driver: Ray interrupts the running job as Ctrl-C would (it saves last.ckpt
    after its current batch and stops), jobs not yet started never start, and the sweep stops
    with one line saying how to finish it. Three jobs, one at a time (each takes both CPUs):
    max_running=2 submits #0 and #1 (Ray places one, holds the other back and cancels it) but
    not #2. Ray does not promise to place #0 first, so the test interrupts whichever it placed."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        *ray_local,
        *SWEEP,
        "trainer.max_epochs=100",
        "hydra.launcher.ray.remote.num_cpus=2",
        "hydra.launcher.max_running=2",
        "seed=1,2,3",
        f"hydra.sweep.dir={sweep}",
    ]
    driver = subprocess.Popen(
        command, cwd=ROOT, env=RAY_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 600  # a loaded CI machine can take minutes to start Ray
    last = rundir.checkpoint_path(Path("*"), rundir.LAST)  # */checkpoints/last.ckpt
    while not (started := [ckpt.parents[1] for ckpt in sweep.glob(str(last))]):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[0]
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)  # the placed job has done an epoch: 99 are left
    (running,) = started
    held_back = 1 - int(running.name.split("_")[0])
    output = driver.communicate(timeout=300)[0]
    assert driver.returncode == 128 + signal.SIGINT, output[-4000:]
    (line,) = [line for line in output.splitlines() if line.startswith("stopped:")]
    assert line.startswith(
        "stopped: sweep stopped by Ctrl-C: 0 of 3 jobs finished, 1 interrupted (lines above), "
        "2 never started."
    ), output[-6000:]
    assert line.endswith(f"run the same command with hydra.sweep.dir={sweep} ckpt_path=auto.")
    submitted = re.findall(r"\t#(\d) : ", output)
    assert submitted == ["0", "1"]
    not_started = rf"job #{held_back} seed={held_back + 1} \(\S+\) failed: not started: the "
    assert re.search(not_started, output), output[-6000:]
    (log,) = running.glob("*.log")
    assert re.search(r"SIGINT in epoch \d+ after batch \d/3: checkpoint saved", log.read_text())
    assert not (running / rundir.RESULTS).exists()
    assert job_dirs(sweep) == [running]


def log_times(job: Path) -> tuple[datetime, datetime]:
    """When the job's log file starts and ends (Hydra's `[YYYY-mm-dd HH:MM:SS,fff]` stamps)."""
    (log,) = job.glob("*.log")
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", log.read_text(), re.M)
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in (stamps[0], stamps[-1]))
    return first, last


def overlap(a: Path, b: Path) -> bool:
    (start_a, end_a), (start_b, end_b) = log_times(a), log_times(b)
    return start_a < end_b and start_b < end_a


@pytest.mark.slow
@needs_ray
def test_a_failed_job_is_listed_while_the_others_share_a_gpu(
    tmp_path: Path, ray_local: tuple[str, ...]
) -> None:
    """Two jobs on half a (fake) GPU each run at once, each with torch's threads set to its one
    CPU (the environment says 2), trainer.devices set to its one GPU (asked: -1, which this
    machine's CPU would refuse), no progress bar, and its own wandb run in the sweep's group;
    a third with a bad value fails without stopping them, and the sweep ends listing it with
    its error line."""
    sweep = tmp_path / "sweep"
    env = {**RAY_ENV, "OMP_NUM_THREADS": "2", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = ray_train(
        "-m",
        *ray_local,
        *SWEEP,
        "trainer.max_epochs=1",
        "trainer.accelerator=auto",
        "trainer.devices=-1",
        "logger=wandb",
        "hydra.launcher.ray.init.num_gpus=1",
        "hydra.launcher.ray.remote.num_gpus=0.5",
        "optimizer.lr=0.1,0.05,-1",
        f"hydra.sweep.dir={sweep}",
        env=env,
    )
    assert proc.returncode == 1, proc.stdout[-4000:]
    first, second, bad = job_dirs(sweep)
    report = proc.stdout[proc.stdout.index("1 of 3 jobs failed") :]
    assert (
        f"#2 optimizer.lr=-1 ({bad}): error: optimizer.lr=-1 is invalid: expected a "
        f"positive number."
    ) in report
    assert "it/s" not in proc.stdout  # no job's progress bar
    for job in (first, second):
        assert results(job)["epochs"] == 1
        (log,) = job.glob("*.log")
        assert "ray: 1 CPU (1 torch threads), GPU 0\n" in log.read_text()
        assert yaml.safe_load((job / rundir.CONFIG).read_text())["trainer"]["devices"] == 1
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        assert read_offline_run(run_file).group == sweep.name
    assert overlap(first, second)


@pytest.mark.slow
@needs_ray
def test_optuna_runs_trials_at_once_into_one_sqlite_study(
    tmp_path: Path, ray_local: tuple[str, ...]
) -> None:
    """`hparams_search=gunn15_optuna hydra/launcher=ray`: n_jobs=2 trials run at once; two
    invocations add their trials to one study through the storage documented in the config."""
    import optuna

    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = (
        "hydra.sweeper.storage={_target_:optuna.storages.RDBStorage,"
        f"url:'{url}',engine_kwargs:{{isolation_level:AUTOCOMMIT}}}}"
    )
    for name in ("first", "second"):
        sweep = tmp_path / name
        proc = ray_train(
            "hparams_search=gunn15_optuna",
            *ray_local,
            *TINY,
            "trainer.max_epochs=1",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",
            storage,
            f"hydra.sweep.dir={sweep}",
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert overlap(*job_dirs(sweep))
    study = optuna.load_study(
        study_name="gunn15_lr_wd",
        storage=optuna.storages.RDBStorage(url, engine_kwargs={"isolation_level": "AUTOCOMMIT"}),
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4
    best = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert best["best_value"] == min(t.value for t in study.trials)


@pytest.mark.slow
@needs_ray
def test_a_sweep_joins_a_running_ray_instance_as_a_cluster(tmp_path: Path) -> None:
    """`hydra.launcher.ray.init.address=<host:port>`: the jobs run in the workers of a Ray
    instance another process started, with its working directory and environment (no
    PROJECT_ROOT), as on a cluster's nodes. They still write into the sweep directory the driver
    resolved (here relative to the driver's working directory) and resolve the project's paths
    as the driver does."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    node, driver = tmp_path / "node", tmp_path / "driver"
    node.mkdir()
    driver.mkdir()
    serve = (
        "import ray, sys; "
        "ray.init(address='local', num_cpus=2, include_dashboard=False, "
        f"object_store_memory=78643200, _temp_dir={temp!r}); "
        "print(ray.get_runtime_context().gcs_address, flush=True); sys.stdin.read()"
    )
    env = {k: v for k, v in RAY_ENV.items() if k != "PROJECT_ROOT"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env["PYTHONPATH"]])
    head = subprocess.Popen(
        [sys.executable, "-c", serve],
        cwd=node,
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        address = head.stdout.readline().strip()
        proc = ray_train(
            "-m",
            "hydra/launcher=ray",
            f"hydra.launcher.ray.init.address={address}",
            *SWEEP,
            "trainer.max_epochs=1",
            "seed=1,2",
            "hydra.sweep.dir=sweep",
            env={**RAY_ENV, "RAY_AUTH_MODE": "token"},  # the instance's token is ~/.ray/auth_token
            cwd=driver,
        )
        assert proc.returncode == 0, proc.stdout[-4000:]
        jobs = job_dirs(driver / "sweep")
        assert [results(job)["seed"] for job in jobs] == [1, 2]
        config = yaml.safe_load((jobs[0] / rundir.CONFIG).read_text())
        assert config["paths"]["root_dir"] == str(ROOT)
        assert list(node.iterdir()) == []  # nothing written where the node's workers run
    finally:
        head.stdin.close()
        head.wait(timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
