"""Part 5 of the GPU check: several runs packed on one device, as `hydra/launcher=ray` with
fractional GPUs packs a sweep's jobs."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import statistics
import time
from functools import partial
from typing import Any

import torch

from gunn_exp.analysis.gpu_check.plan import Plan
from gunn_exp.analysis.gpu_check.report import one_line
from gunn_exp.analysis.gpu_check.throughput import random_batch, training_step
from gunn_exp.analysis.harness import synchronize, timed
from gunn_exp.analysis.memory import PeakMemory
from gunn_exp.analysis.units import MB
from gunn_exp.models import create_model
from gunn_exp.models.layer import DEFAULT_IMPL


def fastest_mode(report: dict[str, Any], plan: Plan) -> str:
    """The compile mode in which the default implementation trained fastest in part 2."""
    rows = report["parts"].get("throughput", {}).get("result", {}).get("rows", [])
    mine = [r for r in rows if r["model"] == f"{plan.model} {DEFAULT_IMPL}"]
    return max(mine, key=lambda r: r["img_per_s"])["mode"] if mine else plan.modes[0]


def _pack_worker(plan: Plan, mode: str, device: str, threads: int, conn: Any) -> None:
    """One packed run: build and warm up, say ready, then time a window whenever told to."""
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        torch.manual_seed(0)
        step = training_step(create_model(plan.model, num_classes=10), mode, plan, dev)
        x, y = random_batch(plan.pack_batch, plan.image_size, 10, dev, seed=0)
        warmup = 3 * timed(partial(step, x, y), dev, calls=3)
        conn.send(("ready", warmup))
        memory = PeakMemory(dev)
        while (message := conn.recv()) is not None:
            start_at, window = message
            memory.reset()
            while time.time() < start_at:  # every run starts its window together
                time.sleep(1e-3)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < window:
                step(x, y)
                n += 1
            synchronize(dev)  # queued steps count only once they have run
            conn.send(("done", (n, time.perf_counter() - t0, memory.read()[1] / MB)))
    except Exception as err:  # noqa: BLE001 (reported to the parent, which records it)
        conn.send(("error", one_line(err)))


def packing(plan: Plan, device: torch.device, deadline: float, mode: str) -> dict[str, Any]:
    """Part 5: images/s summed over 1, 2, 4, 8 runs training at once on one device.

    Each run is its own process (as a sweep's jobs are), started once and compiled once; the first
    compiles alone so that the others find its kernels in the compile caches. For each count the
    first n runs train for the same wall-clock window, started together.
    """
    ctx = mp.get_context("spawn")
    most = plan.pack_runs[-1]
    threads = max(1, (os.cpu_count() or 1) // most)
    workers: list[tuple[Any, Any]] = []
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def receive(conn: Any) -> Any:
        if not conn.poll(max(1.0, deadline - time.monotonic())):
            raise TimeoutError("a packed run did not answer within the time budget")
        kind, value = conn.recv()
        if kind == "error":
            raise RuntimeError(f"a packed run failed: {value}")
        return value

    def start(n: int) -> list[float]:
        new = []
        for _ in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_pack_worker, args=(plan, mode, str(device), threads, child), daemon=True
            )
            proc.start()
            workers.append((proc, parent))
            new.append(parent)
        return [receive(conn) for conn in new]

    try:
        t0 = time.monotonic()
        start(1)
        first_s = time.monotonic() - t0
        t0 = time.monotonic()
        start(most - 1)
        rest_s = time.monotonic() - t0
        for n in plan.pack_runs:
            if time.monotonic() + plan.pack_window_s + 5 > deadline:
                skipped.append(f"{n} runs: skipped (time budget)")
                continue
            start_at = time.time() + 0.5
            for _, conn in workers[:n]:
                conn.send((start_at, plan.pack_window_s))
            done = [receive(conn) for _, conn in workers[:n]]
            per_run = [steps * plan.pack_batch / seconds for steps, seconds, _ in done]
            rows.append(
                {
                    "runs": n,
                    "img_per_s": sum(per_run),
                    "per_run_img_per_s": statistics.mean(per_run),
                    "peak_mb_per_run": max(peak for _, _, peak in done),
                }
            )
        base = rows[0]["img_per_s"] if rows and rows[0]["runs"] == 1 else float("nan")
        for row in rows:
            row["vs_one_run"] = row["img_per_s"] / base
    finally:
        for _, conn in workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for proc, _ in workers:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
    return {
        "model": f"{plan.model} {DEFAULT_IMPL}",
        "mode": mode,
        "batch": plan.pack_batch,
        "window_s": plan.pack_window_s,
        "threads_per_run": threads,
        "first_run_ready_s": first_s,
        "other_runs_ready_s": rest_s,
        "rows": rows,
        "skipped": skipped,
    }
