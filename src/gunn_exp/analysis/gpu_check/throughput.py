"""Parts 2 and 3 of the GPU check: training-step throughput at CIFAR shape, and one GUNN-18 step
at ImageNet size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gunn_exp.analysis.gpu_check.plan import Plan
from gunn_exp.analysis.gpu_check.report import one_line
from gunn_exp.analysis.harness import TrainingStep, time_interleaved, timed
from gunn_exp.analysis.kernels import count_launches
from gunn_exp.analysis.memory import PeakMemory
from gunn_exp.analysis.units import MB
from gunn_exp.models import create_model


def training_step(model: nn.Module, mode: str, plan: Plan, device: torch.device) -> TrainingStep:
    """The check's step: bf16 autocast (float32 on CPU), channels_last, SGD fused on CUDA (the
    per-tensor loop on CPU), compiled regionally with `plan.backend` unless `mode` is eager."""
    cuda = device.type == "cuda"
    step = TrainingStep(
        model,
        device,
        precision=torch.bfloat16 if cuda else None,
        channels_last=True,
        optimizer="fused" if cuda else "default",
    )
    if mode != "eager":
        step.compile("reduce-overhead" if mode == "compile+cudagraphs" else None, plan.backend)
    return step


def random_batch(
    batch: int, size: int, classes: int, device: torch.device, seed: int
) -> tuple[Tensor, Tensor]:
    """Random channels_last images and labels on the device, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last), y


def _free(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _candidates(plan: Plan, num_classes: int) -> Iterator[tuple[str, str, Callable[[], nn.Module]]]:
    """(label, mode, model factory) in priority order: what a short budget keeps comes first.

    Eager rows first (cheap), then the compiled modes from the last one (CUDA graphs, the likely
    fastest) back; within a mode the yardstick, then the implementations in plan order.
    """
    for mode in plan.modes[:1] + plan.modes[:0:-1]:
        yield plan.yardstick, mode, lambda: create_model(plan.yardstick, num_classes=num_classes)
        for impl in plan.impls:
            yield (
                f"{plan.model} {impl}",
                mode,
                lambda impl=impl: create_model(plan.model, num_classes=num_classes, impl=impl),
            )


def throughput(plan: Plan, device: torch.device, deadline: float) -> dict[str, Any]:
    """Part 2: the interleaved table, one block per batch size."""
    rows, skipped = [], []
    for b_index, batch in enumerate(plan.batches):
        # Later batch sizes get an equal share of what is left.
        share = (deadline - time.monotonic()) / (len(plan.batches) - b_index)
        block_deadline = time.monotonic() + share
        x, y = random_batch(batch, plan.image_size, 10, device, seed=batch)
        steps: list[tuple[str, str, TrainingStep]] = []
        last_compile = 0.0
        for label, mode, factory in _candidates(plan, 10):
            # Leave room for timing the block; a compile is assumed to cost the last one's time.
            needed = (last_compile if mode != "eager" else 1.0) + 0.15 * share
            if time.monotonic() + needed > block_deadline:
                skipped.append(f"{label} {mode} batch {batch}: skipped (time budget)")
                continue
            try:
                torch.manual_seed(0)
                step = training_step(factory(), mode, plan, device)
                warm_up_s = step.warm_up(x, y)
                if mode != "eager":
                    last_compile = max(last_compile, warm_up_s)
                steps.append((label, mode, step))
            except Exception as err:  # noqa: BLE001 (recorded; the other rows still run)
                skipped.append(f"{label} {mode} batch {batch}: failed: {one_line(err)}")
        timings = time_interleaved(
            [partial(step, x, y) for _, _, step in steps], device, plan.repeats, plan.steps
        )
        for (label, mode, step), timing in zip(steps, timings, strict=True):
            if timing.error is not None:
                skipped.append(
                    f"{label} {mode} batch {batch}: failed while timed: {one_line(timing.error)}"
                )
                continue
            rows.append(
                {
                    "model": label,
                    "mode": mode,
                    "batch": batch,
                    "img_per_s": batch / timing.step_s,
                    "step_ms": timing.step_s * 1e3,
                    "peak_mb": timing.rise / MB,
                    "compile_s": step.compile_s,
                    "kernels_per_step": sum(count_launches(partial(step, x, y), device)),
                }
            )
        # Each row against the yardstick in the same mode and at the same batch.
        yard = {
            r["mode"]: r["img_per_s"]
            for r in rows
            if r["batch"] == batch and r["model"] == plan.yardstick
        }
        for row in rows:
            if row["batch"] == batch:
                row["vs_yardstick"] = row["img_per_s"] / yard.get(row["mode"], float("nan"))
        del steps
        _free(device)
    return {"rows": rows, "skipped": skipped}


def large_step(plan: Plan, device: torch.device, deadline: float) -> dict[str, Any]:
    """Part 3: one (eager, default implementation) GUNN-18 training step at ImageNet size."""
    name, size, batch = plan.large
    torch.manual_seed(0)
    step = training_step(create_model(name, num_classes=1000), "eager", plan, device)
    x, y = random_batch(batch, size, 1000, device, seed=0)
    step(x, y)  # warm-up (cuDNN algorithm choice, allocator)
    times: list[float] = []
    memory = PeakMemory(device)
    memory.reset()
    while len(times) < 5 and (not times or time.monotonic() + times[-1] < deadline):
        times.append(timed(partial(step, x, y), device))
    peak, rise = memory.read()
    step_s = statistics.median(times)
    result = {
        "model": name,
        "image_size": size,
        "batch": batch,
        "steps": len(times),
        "img_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "peak_mb": peak / MB,
        "step_peak_mb": rise / MB,
    }
    del step
    _free(device)
    return result
