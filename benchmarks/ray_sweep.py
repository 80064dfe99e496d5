"""A sweep through Ray against Hydra's basic launcher on this machine's CPUs, and Ray's start-up.

    python benchmarks/ray_sweep.py [--repeats 2] [--epochs 3] [--out benchmarks/ray_sweep_cpu]

The same 4-job digits sweep (`experiment=digits`, seeds 0-3, `--epochs` each) runs three ways,
one after another in each round (basic, ray, basic on 1 thread, then again), in this one process
so that all see the same machine load:
- `basic`: Hydra's basic launcher, one job after another in the driver, torch on 2 threads (the
  baseline the issue names);
- `ray`: `hydra/launcher=ray` on a local Ray instance of 2 CPUs: 2 jobs at once, 1 CPU and 1
  torch thread each;
- `basic_1thread`: the basic launcher with torch on 1 thread, which separates what running two
  jobs at once gains from what one thread per job gains on a busy machine.
Ray's start-up is measured on its own in each round: `import ray`, `ray.init()` of a local
instance, and its first task (a fresh worker process). Writes OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ("-m", "experiment=digits", "seed=0,1,2,3", "tags=[benchmark]", "print_config=false")
RAY = (
    "hydra/launcher=ray",
    "hydra.launcher.ray.init.num_cpus=2",
    "hydra.launcher.ray.remote.num_cpus=1",
)
# arm -> (extra overrides, the driver's OMP_NUM_THREADS, torch threads per job)
ARMS = {"basic": ((), 2, 2), "ray": (RAY, 2, 1), "basic_1thread": ((), 1, 1)}
STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[1])
t2 = time.perf_counter()
ray.get(ray.remote(lambda: 0).remote())
t3 = time.perf_counter()
ray.shutdown()
print(json.dumps({"import_s": t1 - t0, "init_s": t2 - t1, "first_task_s": t3 - t2}))
"""


def environment(threads: int) -> dict[str, str]:
    src = str(ROOT / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": str(threads),
        "WANDB_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }


def run_sweep(arm: str, epochs: int, sweep_dir: Path, temp: str) -> float:
    """Wall time of the whole sweep, from the command to its exit."""
    extra, threads, _ = ARMS[arm]
    if extra:
        extra = (*extra, f"+hydra.launcher.ray.init._temp_dir={temp}")
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *SWEEP,
        f"trainer.max_epochs={epochs}",
        *extra,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        command, cwd=ROOT, env=environment(threads), capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{arm} sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    finished = list(sweep_dir.glob("*/results.json"))
    if len(finished) != 4:
        raise SystemExit(f"{arm} sweep: {len(finished)} of 4 jobs wrote results.json")
    return wall


def ray_startup(temp: str) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", STARTUP, temp],
        env=environment(1),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds (a sweep of each arm)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per job")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "ray_sweep_cpu")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raybench"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths: <= 107 bytes
    walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
    startups: list[dict[str, float]] = []
    loads: list[float] = []
    try:
        for repeat in range(args.repeats):
            for arm in ARMS:
                walls[arm].append(run_sweep(arm, args.epochs, work / f"{arm}{repeat}", temp))
                loads.append(os.getloadavg()[0])
                print(f"{arm} sweep {repeat + 1}: {walls[arm][-1]:.1f} s", flush=True)
            startups.append(ray_startup(temp))
            print(f"ray start-up {repeat + 1}: {startups[-1]}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    report(args, walls, startups, loads)


def report(
    args: argparse.Namespace,
    walls: dict[str, list[float]],
    startups: list[dict[str, float]],
    loads: list[float],
) -> None:
    median = {arm: statistics.median(v) for arm, v in walls.items()}
    pairs = {
        base: [r / b for b, r in zip(walls[base], walls["ray"], strict=True)]
        for base in ("basic", "basic_1thread")
    }
    start = {k: statistics.median(s[k] for s in startups) for k in startups[0]}
    machine = f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
    command = f"python benchmarks/ray_sweep.py --repeats {args.repeats} --epochs {args.epochs}"
    rows = [
        f"| {arm} | {' '.join(ARMS[arm][0]) or '(basic launcher)'} | {ARMS[arm][2]} | "
        f"{', '.join(f'{w:.1f}' for w in walls[arm])} | {median[arm]:.1f} |"
        for arm in ARMS
    ]
    lines = [
        "# A 4-job digits sweep on the CPU: Ray (2 jobs at once) vs the basic launcher",
        "",
        f"`{command}` on {machine}: 1-minute load average "
        f"{min(loads):.1f}-{max(loads):.1f} after the sweeps. torch {version('torch')}, ray "
        f"{version('ray')}, hydra-ray-launcher {version('hydra-ray-launcher')}. Sweep: "
        f"`train.py {' '.join(SWEEP)} trainer.max_epochs={args.epochs}`, in rounds "
        f"({', '.join(ARMS)}), {args.repeats} rounds.",
        "",
        "| arm | launcher | torch threads per job | sweep wall time (s), by round | median (s) |",
        "|---|---|---:|---|---:|",
        *rows,
        "",
        f"**ray / basic (2 threads): {median['ray'] / median['basic']:.2f}x** (medians; by round "
        f"{', '.join(f'{r:.2f}' for r in pairs['basic'])}). ray / basic on 1 thread: "
        f"{median['ray'] / median['basic_1thread']:.2f}x (by round "
        f"{', '.join(f'{r:.2f}' for r in pairs['basic_1thread'])}): running 2 jobs at once, "
        f"apart from the thread count.",
        "",
        f"Ray's start-up (median of {len(startups)}): `import ray` {start['import_s']:.2f} s, "
        f"`ray.init()` of a local instance {start['init_s']:.2f} s, its first task (a fresh "
        f"worker) {start['first_task_s']:.2f} s. Each Ray job also imports torch and Lightning "
        f"in a fresh process, which the basic launcher does once for the whole sweep.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    data = {"command": command, "walls_s": walls, "startup_s": startups, "load_avg": loads}
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
