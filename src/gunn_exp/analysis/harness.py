"""One training step as the benchmarks measure it, and its timing with device synchronisation.

`TrainingStep` owns what a measured step needs: the model on the device in its memory format, SGD
as the recipes train with it, autocast (with a GradScaler for float16) and regional compilation.
`timed` synchronises the device around the calls it times: CUDA runs asynchronously, and without a
sync a timer measures how fast the CPU queues kernels, not how fast they run. `time_interleaved`
times several steps in the same process, in turns, with the peak memory of each block.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn_exp.analysis.memory import PeakMemory
from gunn_exp.models.compile import compile_regions

# torch's SGD implementations: how many kernels an update launches, not what it computes.
# fused: one for all tensors (CUDA; CPU since torch 2.4); foreach: a few multi-tensor ones; loop:
# about 5 per parameter tensor (3,460 for GUNN-15's 692); default: torch's pick for the device
# (foreach on CUDA, loop on CPU).
SGD_KERNELS: dict[str, dict[str, bool]] = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "loop": {"foreach": False},
    "default": {},
}


def sgd(params: Iterable[nn.Parameter], kernels: str = "fused") -> torch.optim.SGD:
    """SGD as conf/optimizer/sgd.yaml trains (lr 0.1, Nesterov momentum 0.9, weight decay 1e-4)."""
    return torch.optim.SGD(
        params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, **SGD_KERNELS[kernels]
    )


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, calls: int = 1) -> float:
    """Seconds per call of `fn`, `calls` calls in a row, the device synchronised around them."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


class TrainingStep:
    """zero_grad, forward and cross-entropy under autocast, backward, SGD step: `step(x, y)`.

    `precision`: the autocast dtype (None: float32); `channels_last`: the model in NHWC (give it
    NHWC inputs too); `optimizer`: which SGD kernels (`SGD_KERNELS`).
    """

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        *,
        precision: torch.dtype | None = None,
        channels_last: bool = False,
        optimizer: str = "fused",
    ) -> None:
        memory_format = torch.channels_last if channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format)
        self.device = device
        self.optimizer = sgd(self.model.parameters(), optimizer)
        self.autocast: Callable[[], AbstractContextManager[Any]] = (
            partial(torch.autocast, device.type, dtype=precision) if precision else nullcontext
        )
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
        self.compiled = False
        self.compile_s = float("nan")

    def compile(self, mode: str | None = None, backend: str = "inductor") -> None:
        """Compile the model regionally, in place (`gunn_exp.models.compile`); the next steps
        compile it (see `warm_up`)."""
        compile_regions(self.model, mode=mode, backend=backend)
        self.compiled = True

    def __call__(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.model(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def warm_up(self, x: Tensor, y: Tensor) -> float:
        """Three timed steps; returns the first two's seconds (a compile, cuDNN's autotuning).

        A compiled model compiles in the first step and records its CUDA graphs (mode
        reduce-overhead) in the second: `compile_s` becomes those two less two steady steps.
        """
        first, second, steady = [timed(partial(self, x, y), self.device) for _ in range(3)]
        if self.compiled:
            self.compile_s = first + second - 2 * steady
        return first + second


@dataclass
class Timing:
    """One step's timed blocks: seconds per step and (peak, rise) bytes of each block."""

    seconds: list[float] = field(default_factory=list)
    peaks: list[tuple[float, float]] = field(default_factory=list)
    error: Exception | None = None  # what stopped it; its other blocks were not timed

    @property
    def step_s(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def peak(self) -> float:
        return statistics.median(p for p, _ in self.peaks) if self.peaks else float("nan")

    @property
    def rise(self) -> float:
        return statistics.median(r for _, r in self.peaks) if self.peaks else float("nan")


def time_interleaved(
    steps: Sequence[Callable[[], Any]], device: torch.device, repeats: int, calls: int
) -> list[Timing]:
    """Time `calls` calls of each step, `repeats` times, the steps interleaved in an order that
    rotates by one each repeat, with the peak memory of each block (`PeakMemory`).

    Interleaving spreads a shared machine's load changes over every step, and the rotation keeps
    any step from always running right after the same other one. A step that raises is recorded
    in its `Timing.error` and left out of the later repeats; the others go on.
    """
    memory = PeakMemory(device)
    timings = [Timing() for _ in steps]
    for r in range(repeats):
        shift = r % max(1, len(steps))
        for i in [*range(shift, len(steps)), *range(shift)]:
            if timings[i].error is not None:
                continue
            try:
                memory.reset()
                timings[i].seconds.append(timed(steps[i], device, calls))
                timings[i].peaks.append(memory.read())
            except Exception as err:  # noqa: BLE001 (recorded; the other steps still run)
                timings[i].error = err
    return timings
