"""One-command check of the GPU path: `python -m gunn_exp.gpu_check [--quick]` (`make gpu-check`).

Runs offline on a fresh node (no dataset on disk) and writes `benchmarks/gpu_<device>.md` and
`.json` (after every part): the machine, the torch/CUDA versions, the command, and five parts:

1. exactness: every GUNN layer implementation against `reference` on the device, in float32
   (TF32 off, tight tolerance) and under bf16 autocast with channels_last (to bf16 rounding):
   outputs, input and parameter gradients, BatchNorm running statistics; the default
   implementation also compiled as `compile=true` runs it (its segment functions);
2. throughput: GUNN-15 training steps at CIFAR shape (bf16 autocast, channels_last, fused SGD) for
   `reference` / `keep_convs` / `recompute` x eager / compile / compile + CUDA graphs, with the
   CIFAR ResNet-18 yardstick in the same process; models interleaved, medians; img/s, ratio to the
   yardstick, peak `max_memory_allocated`, compile time, kernels per step (profiler);
3. one GUNN-18 training step at 224x224, bf16, batch 64: img/s and peak memory;
4. end to end through `train.py` (trainer=gpu, a generated CIFAR-10 folder read by the real loader,
   data.on_device=true, compile=true, 2 short epochs), a resume to a third epoch, `eval.py`;
5. packing: 1, 2, 4, 8 GUNN-15 runs (processes) training at once on the device, images/s summed,
   in the compile mode part 2 found fastest for the default implementation.

Each part is guarded: a failure is recorded in the report and the next part still runs. Each part
has a time budget (the whole fits in about 8 minutes on one H100/H200); what a budget cuts is reported as
skipped. Without CUDA the same command runs a tiny CPU version of every part (small shapes,
gunn_mini, compile with the `aot_eager` backend), so the script is exercised by the tests; its
numbers say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn_exp.models import GunnLayer, create_model
from gunn_exp.models.compile import compile_regions
from gunn_exp.models.layer import DEFAULT_IMPL, IMPLEMENTATIONS

ROOT = Path(__file__).resolve().parents[2]  # the checkout: train.py, eval.py, conf/
MODES = ("eager", "compile", "compile+cudagraphs")
_MB = 2**20


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of every part: the GPU check, or its tiny CPU version."""

    gpu: bool
    # Part 1: one GUNN layer (channels, segments) on a (batch, size, size) input.
    layer: tuple[int, int, int, int]
    # Part 2.
    model: str
    batches: tuple[int, ...]
    impls: tuple[str, ...]
    modes: tuple[str, ...]
    backend: str
    yardstick: str
    image_size: int
    steps: int
    repeats: int
    # Part 3: model, image size, batch.
    large: tuple[str, int, int]
    # Part 4.
    e2e_model: str
    e2e_batch: int
    e2e_batches_per_epoch: int
    e2e_compile: bool
    # Part 5: runs packed on one device (counts), each training `model` at this batch.
    pack_runs: tuple[int, ...] = (1, 2)
    pack_batch: int = 4
    pack_window_s: float = 1.0
    budgets: dict[str, float] = field(default_factory=dict)


GPU_PLAN = Plan(
    gpu=True,
    layer=(240, 20, 8, 32),  # GUNN-15's first stage
    model="gunn15",
    batches=(64, 256),
    impls=("reference", "keep_convs", "recompute"),
    modes=MODES,
    backend="inductor",
    yardstick="resnet18_cifar",
    image_size=32,
    steps=10,
    repeats=5,
    large=("gunn18", 224, 64),
    e2e_model="gunn_mini",
    e2e_batch=64,
    e2e_batches_per_epoch=20,
    e2e_compile=True,
    pack_runs=(1, 2, 4, 8),
    pack_batch=64,  # the CIFAR recipe's batch
    pack_window_s=6.0,
    # Seconds; about 8 minutes in all, plus imports and the report.
    budgets={"exactness": 30, "throughput": 240, "large": 30, "end_to_end": 130, "packing": 100},
)

# Without CUDA: every part at toy size. Inductor compiles take minutes on a CPU, so the compiled
# rows use the aot_eager backend (Dynamo + AOTAutograd tracing, no code generation), and the
# end-to-end run trains uncompiled.
CPU_PLAN = Plan(
    gpu=False,
    layer=(24, 3, 4, 8),
    model="gunn_mini",
    batches=(4,),
    impls=("reference", "recompute"),
    modes=("eager", "compile"),
    backend="aot_eager",
    yardstick="resnet18_cifar",
    image_size=16,
    steps=1,
    repeats=2,
    large=("gunn18", 64, 2),
    e2e_model="gunn_mini",
    e2e_batch=8,
    e2e_batches_per_epoch=3,
    e2e_compile=False,
    budgets={"exactness": 30, "throughput": 120, "large": 30, "end_to_end": 180, "packing": 90},
)


def quick(plan: Plan) -> Plan:
    """`--quick`: one batch size, fewer repeats, smaller budgets (about half the time)."""
    return replace(
        plan,
        batches=plan.batches[:1],
        repeats=max(2, plan.repeats - 2),
        budgets={k: v / 2 for k, v in plan.budgets.items()},
    )


# --------------------------------------------------------------------------------------------
# Part 1: exactness of every implementation against `reference`.


def _rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@contextmanager
def _exact_float32(device: torch.device) -> Iterator[None]:
    """float32 convolutions and matmuls without TF32 (CUDA's default for convolutions)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def _layer_run(
    layer: GunnLayer, x: Tensor, grad: Tensor, dtype: torch.dtype | None
) -> dict[str, Tensor]:
    """One forward/backward of `layer`: output, gradients and running statistics by name."""
    x = x.clone().requires_grad_(True)
    ctx = torch.autocast(x.device.type, dtype=dtype) if dtype else nullcontext()
    with ctx:
        out = layer(x)
    (out.float() * grad).sum().backward()
    result = {"output": out.detach().float(), "grad x": x.grad}
    for name, p in layer.named_parameters():
        result[f"grad {name}"] = p.grad
    for name, b in layer.named_buffers():
        if b.is_floating_point():
            result[f"buffer {name}"] = b
    return result


_GROUPS = ("output", "grad x", "grad params", "BN stats")


def _group_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """Largest `_rel_err` per group of tensors (output, input grad, parameter grads, BN stats)."""
    errs = dict.fromkeys(_GROUPS, 0.0)
    for name, value in got.items():
        group = name if name in errs else "grad params" if name.startswith("grad") else "BN stats"
        errs[group] = max(errs[group], _rel_err(value, ref[name]))
    return errs


# float32: every implementation must match `reference` to this (TF32 off; only summation order
# differs). bf16 autocast: the implementations round at other points than autograd does, so they
# are held to bf16 rounding itself: their error against the float32 reference may be at most
# BF16_FACTOR times the bf16 reference's own error against it (plus BF16_FLOOR).
FP32_TOL = 1e-4


def _run_impl(
    state: dict[str, Tensor],
    update: str,
    x: Tensor,
    grad: Tensor,
    impl: str,
    dtype: torch.dtype | None,
    backend: str | None = None,
) -> dict[str, Tensor]:
    """`_layer_run` of a GunnLayer with implementation `impl` and parameters `state`, compiled
    regionally with `backend` if given."""
    channels = x.shape[1]
    segments = channels // state["units.0.conv_out.weight"].shape[0]
    layer = GunnLayer(channels, segments, update=update, impl=impl).to(x.device)
    layer.load_state_dict(state)
    if backend is not None:
        compile_regions(layer, backend=backend)
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
    return _layer_run(layer.to(memory_format=fmt or torch.contiguous_format), x, grad, dtype)


BF16_FACTOR = 2.0
BF16_FLOOR = 1e-3


def check_exactness(plan: Plan, device: torch.device, deadline: float) -> dict[str, Any]:
    """Largest relative error of each implementation vs `reference`, per group of tensors.

    float32 rows: error against the float32 reference. bf16 rows: error against the float32
    reference, beside the bf16 reference's own (the `tolerance` column derives from it).
    """
    channels, segments, batch, size = plan.layer
    cases = [
        ("float32", "gradual", None, torch.contiguous_format),
        ("float32", "simultaneous", None, torch.contiguous_format),
        ("bf16 autocast, channels_last", "gradual", torch.bfloat16, torch.channels_last),
    ]
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=gen).to(device)
    grad = torch.randn(batch, channels, size, size, generator=gen).to(device)
    for precision, update, dtype, fmt in cases:
        torch.manual_seed(0)
        ref_layer = GunnLayer(channels, segments, update=update, impl="reference").to(device)
        with torch.no_grad():  # non-trivial BN affine parameters
            for m in ref_layer.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
        state = {k: v.clone() for k, v in ref_layer.state_dict().items()}
        xin = x.contiguous(memory_format=fmt)

        run = partial(_run_impl, state, update, xin, grad)

        with _exact_float32(device):
            ref = run("reference", None)
            tols = dict.fromkeys(_GROUPS, FP32_TOL)
            if dtype is not None:
                own = _group_errors(run("reference", dtype), ref)
                tols = {g: BF16_FACTOR * e + BF16_FLOOR for g, e in own.items()}
                rows.append(
                    {
                        "impl": "reference",
                        "precision": precision,
                        "update": update,
                        **own,
                        "tolerance": "(bf16 rounding)",
                        "ok": True,
                    }
                )
            # Every implementation eagerly, and the default one as `compile=true` runs it.
            variants = [(impl, None) for impl in sorted(IMPLEMENTATIONS) if impl != "reference"]
            for impl, backend in [*variants, (DEFAULT_IMPL, plan.backend)]:
                label = impl if backend is None else f"{impl}, compiled ({backend})"
                row: dict[str, Any] = {"impl": label, "precision": precision, "update": update}
                if time.monotonic() > deadline:
                    failures.append(f"{label} {precision} {update}: skipped (time budget)")
                    continue
                try:
                    errs = _group_errors(run(impl, dtype, backend), ref)
                except Exception as err:  # noqa: BLE001 (recorded; the other cases still run)
                    rows.append({**row, "ok": f"error: {_one_line(err)}"})
                    failures.append(f"{label} {precision} {update}: {_one_line(err)}")
                    continue
                bad = {g: f"{errs[g]:.3g} > {tols[g]:.3g}" for g in _GROUPS if errs[g] > tols[g]}
                tolerance = (
                    f"{FP32_TOL:g}"
                    if dtype is None
                    else "≤ " + " / ".join(f"{tols[g]:.2g}" for g in _GROUPS)
                )
                rows.append({**row, **errs, "tolerance": tolerance, "ok": not bad})
                if bad:
                    failures.append(f"{label} {precision} {update}: {bad}")
    return {
        "layer": f"GunnLayer(C={channels}, K={segments}), input {batch}x{channels}x{size}^2",
        "rows": rows,
        "failures": failures,
    }


# --------------------------------------------------------------------------------------------
# Part 2 and 3: training-step throughput.


class _Step:
    """One model's training step: bf16 autocast (float32 on CPU), channels_last, (fused) SGD."""

    def __init__(
        self, label: str, model: nn.Module, mode: str, plan: Plan, device: torch.device
    ) -> None:
        self.label, self.mode = label, mode
        self.model = model.to(device, memory_format=torch.channels_last)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=0.1,
            momentum=0.9,
            nesterov=True,
            weight_decay=1e-4,
            **fused,
        )
        self.device = device
        self.autocast = device.type == "cuda"
        if mode != "eager":
            compile_mode = "reduce-overhead" if mode == "compile+cudagraphs" else None
            compile_regions(self.model, mode=compile_mode, backend=plan.backend)
        self.compile_s = float("nan")

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()


def _repeat(step: _Step, x: Tensor, y: Tensor, n: int) -> None:
    for _ in range(n):
        step(x, y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def kernels_per_step(step: Callable[[], None], device: torch.device) -> int:
    """Kernels one call of `step` launches, from the profiler.

    CUDA: GPU activities (kernels, memcpy, memset) that CUPTI records. CPU: top-level ATen
    operators, which is what eager CPU code runs (on CPU no separate kernel launch exists).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.events()
    if device.type == "cuda":
        count = sum(1 for e in events if e.device_type == DeviceType.CUDA)
        return count or sum(len(e.kernels) for e in events)
    return sum(1 for e in events if e.name.startswith("aten::") and not _under_aten(e))


def _under_aten(event: Any) -> bool:
    """Whether a profiler event runs inside another ATen operator (then it is not a launch)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / _MB if device.type == "cuda" else float("nan")


def _reset_peak(device: torch.device) -> float:
    """Start a peak-memory window; returns the MB allocated now (0 on CPU)."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / _MB


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
        gen = torch.Generator().manual_seed(batch)
        size = plan.image_size
        x = torch.randn(batch, 3, size, size, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        steps: list[_Step] = []
        last_compile = 0.0
        for label, mode, factory in _candidates(plan, 10):
            # Leave room for timing the block; a compile is assumed to cost the last one's time.
            needed = (last_compile if mode != "eager" else 1.0) + 0.15 * share
            if time.monotonic() + needed > block_deadline:
                skipped.append(f"{label} {mode} batch {batch}: skipped (time budget)")
                continue
            try:
                torch.manual_seed(0)
                step = _Step(label, factory(), mode, plan, device)
                first = _timed(partial(step, x, y), device)
                second = _timed(partial(step, x, y), device)  # CUDA graphs record on call 2
                steady = _timed(partial(step, x, y), device)
                if mode != "eager":
                    step.compile_s = first + second - 2 * steady
                    last_compile = max(last_compile, first + second)
                steps.append(step)
            except Exception as err:  # noqa: BLE001 (recorded; the other rows still run)
                skipped.append(f"{label} {mode} batch {batch}: failed: {_one_line(err)}")
        times: dict[int, list[float]] = {i: [] for i in range(len(steps))}
        peaks: dict[int, list[float]] = {i: [] for i in range(len(steps))}
        failed: set[int] = set()
        for r in range(plan.repeats):
            order = list(range(len(steps)))
            order = order[r % max(1, len(order)) :] + order[: r % max(1, len(order))]
            for i in (i for i in order if i not in failed):
                try:
                    start = _reset_peak(device)
                    block = partial(_repeat, steps[i], x, y, plan.steps)
                    times[i].append(_timed(block, device) / plan.steps)
                    peaks[i].append(_peak_mb(device) - start)
                except Exception as err:  # noqa: BLE001 (recorded; the other rows still run)
                    failed.add(i)
                    skipped.append(
                        f"{steps[i].label} {steps[i].mode} batch {batch}: "
                        f"failed while timed: {_one_line(err)}"
                    )
        for i, s in enumerate(steps):
            if i in failed:
                continue
            step_s = statistics.median(times[i]) if times[i] else float("nan")
            row = {
                "model": s.label,
                "mode": s.mode,
                "batch": batch,
                "img_per_s": batch / step_s,
                "step_ms": step_s * 1e3,
                "peak_mb": statistics.median(peaks[i]) if peaks[i] else float("nan"),
                "compile_s": s.compile_s,
                "kernels_per_step": kernels_per_step(partial(s, x, y), device),
            }
            rows.append(row)
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
    step = _Step(name, create_model(name, num_classes=1000), "eager", plan, device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    step(x, y)  # warm-up (cuDNN algorithm choice, allocator)
    times = []
    start = _reset_peak(device)
    while len(times) < 5 and (not times or time.monotonic() + times[-1] < deadline):
        times.append(_timed(partial(step, x, y), device))
    step_s = statistics.median(times)
    result = {
        "model": name,
        "image_size": size,
        "batch": batch,
        "steps": len(times),
        "img_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "peak_mb": _peak_mb(device),
        "step_peak_mb": _peak_mb(device) - start,
    }
    del step
    _free(device)
    return result


# --------------------------------------------------------------------------------------------
# Part 5: several runs packed on one device (what `hydra/launcher=ray` with fractional GPUs does).


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
        step = _Step(plan.model, create_model(plan.model, num_classes=10), mode, plan, dev)
        gen = torch.Generator().manual_seed(0)
        size = plan.image_size
        x = torch.randn(plan.pack_batch, 3, size, size, generator=gen).to(dev)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (plan.pack_batch,), generator=gen).to(dev)
        warmup = _timed(partial(_repeat, step, x, y, 3), dev)
        conn.send(("ready", warmup))
        while (message := conn.recv()) is not None:
            start_at, window = message
            before = _reset_peak(dev)
            while time.time() < start_at:  # every run starts its window together
                time.sleep(1e-3)
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < window:
                step(x, y)
                n += 1
            _sync(dev)  # queued steps count only once they have run
            conn.send(("done", (n, time.perf_counter() - t0, _peak_mb(dev) - before)))
    except Exception as err:  # noqa: BLE001 (reported to the parent, which records it)
        conn.send(("error", _one_line(err)))


def packing(plan: Plan, device: torch.device, deadline: float, mode: str) -> dict[str, Any]:
    """Part 5: images/s summed over 1, 2, 4, 8 runs training at once on one device.

    Each run is its own process (as a sweep's jobs are), started once and compiled once; the first
    compiles alone so that the others find its kernels in the compile caches. For each count the
    first n runs train for the same wall-clock window, started together.
    """
    import multiprocessing as mp

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
        for proc, conn in workers:
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


# --------------------------------------------------------------------------------------------
# Part 4: train.py, resume, eval.py on a generated CIFAR-10.


def write_fake_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Random images in the CIFAR-10 python-pickle layout torchvision reads; returns `root`.

    5 train batches of n_train/5 rows, a test batch and the meta file, uint8 rows of 3x32x32.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict[str, Any]:
        return {
            "data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=n).tolist(),
        }

    files: dict[str, Any] = {f"data_batch_{i}": batch(n_train // 5) for i in range(1, 6)}
    files["test_batch"] = batch(n_test)
    files["batches.meta"] = {"label_names": [f"class{i}" for i in range(10)]}
    for name, content in files.items():
        with (folder / name).open("wb") as f:
            pickle.dump(content, f)
    return root


def _run(args: list[str], timeout: float) -> tuple[float, str]:
    """Run an entry point of the checkout; (seconds, last lines of output); raises on failure."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(1.0, timeout),
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise RuntimeError(f"{shlex.join(args)} exited {proc.returncode}:\n" + "\n".join(tail))
    return seconds, proc.stdout


def end_to_end(plan: Plan, device: torch.device, deadline: float) -> dict[str, Any]:
    """Part 4: 2 epochs of train.py, resumed to 3, then eval.py, on a generated CIFAR-10."""
    if not (ROOT / "train.py").is_file():
        raise FileNotFoundError(f"{ROOT / 'train.py'} is missing: run from the repo checkout.")
    work = Path(tempfile.mkdtemp(prefix="gunn_gpu_check_"))
    n_train = plan.e2e_batch * plan.e2e_batches_per_epoch
    write_fake_cifar10(work / "data", n_train=n_train, n_test=2 * plan.e2e_batch)
    run_dir = work / "run"
    common = [
        f"model={plan.e2e_model}",
        "data=cifar10",
        f"paths.data_dir={work / 'data'}",
        "data.download=false",
        "data.verify_checksums=false",  # generated files: real format, not the real md5
        f"data.batch_size={plan.e2e_batch}",
        "data.num_workers=0",
        "data.on_device=true",
        f"trainer={'gpu' if plan.gpu else 'cpu'}",
        "logger=csv",
        "channels_last=true",
        f"compile={str(plan.e2e_compile).lower()}",
        f"hydra.run.dir={run_dir}",
        "print_config=false",
    ]
    timings = {}
    timings["train 2 epochs"], _ = _run(
        ["train.py", *common, "trainer.max_epochs=2"], deadline - time.monotonic()
    )
    timings["resume to epoch 3"], _ = _run(
        # Extending the run on purpose (a changed schedule is refused without the flag).
        ["train.py", *common, "trainer.max_epochs=3", "ckpt_path=last", "allow_config_change=true"],
        deadline - time.monotonic(),
    )
    results = json.loads((run_dir / "results.json").read_text())
    if results["epochs"] != 3:
        raise RuntimeError(f"resumed run reports {results['epochs']} epochs, expected 3")
    timings["eval.py"], _ = _run(["eval.py", f"run_dir={run_dir}"], deadline - time.monotonic())
    evals = sorted(p.relative_to(run_dir).as_posix() for p in (run_dir / "eval").rglob("*.json"))
    if not evals:
        raise RuntimeError(f"eval.py wrote no results under {run_dir / 'eval'}")
    return {
        "command": shlex.join(["python", "train.py", *common]),
        "seconds": timings,
        "epochs": results["epochs"],
        "test_err1": results["test_err1"],
        "eval_outputs": evals,
        "run_dir": str(run_dir),
    }


# --------------------------------------------------------------------------------------------
# Report.


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_cores": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    return info


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns)
    body = "\n".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows)
    return f"{head}\n{body}"


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check: {m.get('gpu', 'CPU only')}",
        "",
        f"Measured {report['started']} in {report['total_s']:.0f} s. `{report['command']}`",
        "",
        ", ".join(f"{k} {v}" for k, v in m.items()),
        "",
    ]
    if not report["plan"]["gpu"]:
        lines += [
            "**No CUDA device: this is the tiny CPU version of every part (gunn_mini, toy shapes, "
            "compile with aot_eager). Its numbers say nothing about a GPU; GPU numbers need a "
            "GPU.**",
            "",
        ]
    parts = report["parts"]
    titles = {
        "exactness": "1. Exactness vs reference (max relative error)",
        "throughput": "2. Training-step throughput",
        "large": "3. GUNN-18 at ImageNet size",
        "end_to_end": "4. End to end: train.py, resume, eval.py",
        "packing": "5. Runs packed on one device",
    }
    for key, title in titles.items():
        part = parts.get(key, {})
        lines += [
            f"## {title}",
            "",
            f"status: **{part.get('status', 'not run')}** ({part.get('seconds', 0):.0f} s)",
            "",
        ]
        if "error" in part:
            lines += ["```", part["error"], "```", ""]
        result = part.get("result") or {}
        if key == "exactness" and result:
            lines += [
                result["layer"],
                "",
                _table(
                    result["rows"],
                    [
                        "impl",
                        "precision",
                        "update",
                        "output",
                        "grad x",
                        "grad params",
                        "BN stats",
                        "tolerance",
                        "ok",
                    ],
                ),
                "",
            ]
            lines += [f"- {f}" for f in result["failures"]] + [""]
        elif key == "throughput" and result:
            lines += [
                "bf16 autocast (GPU), channels_last, SGD (fused on GPU); median of interleaved "
                "blocks. vs_yardstick: img/s over the yardstick's in the same mode and batch. "
                "peak_mb: max_memory_allocated during the steps above what was allocated before "
                "them (model, optimizer state and CUDA-graph pools excluded). "
                "compile_s: first two steps minus two steady ones. kernels: GPU activities per "
                "step (profiler; CPU: ATen operators not inside another one).",
                "",
                _table(
                    result["rows"],
                    [
                        "model",
                        "mode",
                        "batch",
                        "img_per_s",
                        "vs_yardstick",
                        "step_ms",
                        "peak_mb",
                        "compile_s",
                        "kernels_per_step",
                    ],
                ),
                "",
            ]
            lines += [f"- {s}" for s in result["skipped"]] + [""]
        elif key == "packing" and result:
            lines += [
                f"{result['model']}, {result['mode']}, batch {result['batch']} per run, "
                f"{result['threads_per_run']} CPU threads per run; each run a process, all "
                f"timed over the same {result['window_s']:g} s window. img_per_s: summed over "
                "the runs; vs_one_run: over one run alone; peak_mb_per_run: the largest run's "
                "max_memory_allocated during the window above what it held before (the CUDA "
                "context, about 0.5 GB a process, not included). Ready in "
                f"{result['first_run_ready_s']:.0f} s (first run, cold caches), "
                f"{result['other_runs_ready_s']:.0f} s (the others, together).",
                "",
                _table(
                    result["rows"],
                    ["runs", "img_per_s", "vs_one_run", "per_run_img_per_s", "peak_mb_per_run"],
                ),
                "",
            ]
            lines += [f"- {s}" for s in result["skipped"]] + [""]
        elif result:
            lines += ["```json", json.dumps(result, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch size, half the budgets")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="report folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=1.0,
        help="multiply every part's time budget (e.g. 2 on a node with a slow CPU)",
    )
    parser.add_argument(
        "--parts",
        default="exactness,throughput,large,end_to_end,packing",
        help="comma-separated subset of the parts to run",
    )
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (part 2)")
    parser.add_argument("--impls", help="comma-separated layer implementations (part 2)")
    parser.add_argument("--batches", help="comma-separated batch sizes (part 2)")
    args = parser.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    plan = quick(plan) if args.quick else plan
    plan = replace(plan, budgets={k: v * args.budget_factor for k, v in plan.budgets.items()})
    if args.modes:
        plan = replace(plan, modes=tuple(args.modes.split(",")))
    if args.impls:
        plan = replace(plan, impls=tuple(args.impls.split(",")))
    if args.batches:
        plan = replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what trainer=gpu sets
    command = shlex.join(["python", "-m", "gunn_exp.gpu_check", *(argv or sys.argv[1:])])
    report: dict[str, Any] = {
        "command": command,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(device),
        "plan": {k: v for k, v in plan.__dict__.items()},
        "parts": {},
    }
    functions = {
        "exactness": check_exactness,
        "throughput": throughput,
        "large": large_step,
        "end_to_end": end_to_end,
        # Packs the default implementation in the mode part 2 found fastest (when it ran).
        "packing": lambda plan, device, deadline: packing(
            plan, device, deadline, fastest_mode(report, plan)
        ),
    }
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(functions))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(functions)}")
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_{device_slug(device)}"
    for name in wanted:
        t0 = time.monotonic()
        print(f"[gpu_check] {name} (budget {plan.budgets[name]:.0f} s) ...", flush=True)
        try:
            result = functions[name](plan, device, t0 + plan.budgets[name])
            failed = bool(result.get("failures")) if isinstance(result, dict) else False
            part = {"status": "FAILED" if failed else "ok", "result": result}
        except Exception as err:  # noqa: BLE001 (recorded; the next part still runs)
            part = {"status": "FAILED", "error": traceback.format_exc(limit=3)[-3000:]}
            print(f"[gpu_check] {name} failed: {_one_line(err)}", flush=True)
        part["seconds"] = time.monotonic() - t0
        report["parts"][name] = part
        print(f"[gpu_check] {name}: {part['status']} in {part['seconds']:.0f} s", flush=True)
        # Written after every part: a run cut short (a lease ending) keeps what it measured.
        report["total_s"] = time.monotonic() - start
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.md and {stem}.json")
    return report


if __name__ == "__main__":
    # Every part ran; the exit status says whether all of them passed (for CI and `make`).
    parts = main()["parts"].values()
    sys.exit(0 if all(part["status"] == "ok" for part in parts) else 1)
