"""Training-step benchmark of the GUNN layer implementations, with a ResNet-18 yardstick (issue 4).

`run(cfg)` builds the configured model once per implementation in `cfg.impls` (same weights), plus
the yardstick, and measures each on the same random batch of the data config's shape:

- step time (zero_grad, forward, cross-entropy, backward, SGD step) and images/s: `repeats` timed
  blocks of `steps` steps, models interleaved in a rotating order within each repeat, median;
- peak memory of those steps: on CUDA `max_memory_allocated` (absolute, and above what was
  allocated before the step); on CPU the process's peak RSS (VmHWM, reset before each block
  through /proc/self/clear_refs) and its rise over the RSS before the block;
- activation bytes autograd saves for backward per image (`complexity.saved_activation_bytes`);
- ATen ops dispatched per training step (forward, backward, optimizer), counted eagerly, and the
  kernels one eager step launches (`count_launches`: ATen operators that run work, views and
  allocations excluded; on CUDA the GPU kernels the profiler records);
- with `compile=true`: the models are compiled regionally (`gunn_exp.models.compile`), and the
  compile time and the kernels of one compiled step are reported: inductor's generated kernels
  and the extern ATen kernels (convolutions, matrix products) its code calls;
- multiply-adds per image (`complexity.count_macs`) and parameters;
- every quantity's ratio to the plain implementation ("reference").

On CPU glibc's malloc would otherwise raise its mmap threshold after the first large free, after
which RSS depends on which model ran before; the benchmark pins the threshold (same allocator rules
for every model) before it allocates anything. Results go to `<output.dir>/<name>.csv` and `.md`.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from gunn_exp.analysis.complexity import count_macs, count_params, saved_activation_bytes
from gunn_exp.data.gpu_augment import augment
from gunn_exp.models import GunnLayer, create_model
from gunn_exp.models.compile import compile_regions

PLAIN = "reference"
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_MMAP_THRESHOLD = -3  # glibc mallopt parameter M_MMAP_THRESHOLD
_MB = 1e6


@dataclass
class Row:
    """One benchmarked model; sizes in MB (1e6 bytes), times in ms."""

    model: str
    impl: str
    device: str
    precision: str
    batch_size: int
    images_per_s: float
    step_ms: float
    peak_mb: float
    step_peak_mb: float
    act_mb_per_image: float
    ops_per_step: int
    launches_per_step: int
    compile_s: float
    compiled_kernels: float  # generated + extern kernels of one compiled step (nan: not compiled)
    compiled_generated: float
    compiled_extern: float
    gmacs_per_image: float
    params_m: float
    time_vs_plain: float = float("nan")
    step_peak_vs_plain: float = float("nan")
    peak_vs_plain: float = float("nan")
    act_vs_plain: float = float("nan")


class _OpCounter(TorchDispatchMode):
    """Counts ATen ops as they are dispatched (backward and optimizer included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.count += 1
        return func(*args, **(kwargs or {}))


# ATen operators that launch no kernel: views, metadata, allocations, no-op conversions and checks
# (when `contiguous`, `to`, `reshape` copy, the copy is their child and is counted instead).
_NO_KERNEL = frozenset(
    f"aten::{name}"
    for name in [
        "view",
        "alias",
        "as_strided",
        "expand",
        "expand_as",
        "permute",
        "t",
        "transpose",
        "slice",
        "select",
        "split",
        "split_with_sizes",
        "unbind",
        "unsqueeze",
        "squeeze",
        "flatten",
        "unflatten",
        "chunk",
        "narrow",
        "detach",
        "view_as",
        "_unsafe_view",
        "reshape",
        "contiguous",
        "to",
        "lift_fresh",
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "resize_",
        "set_",
        "_reshape_alias",
        "numpy_T",
        "resolve_conj",
        "resolve_neg",
        "_nnpack_available",
    ]
)


def _is_generated_kernel(name: str) -> bool:
    """Inductor's generated kernels as the profiler names them (C++ ones need
    `torch._inductor.config.cpp.enable_kernel_profile`)."""
    return "cpp_fused" in name or name.startswith("triton_")


def count_launches(step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """Kernels one call of `step` launches: (generated by inductor, others), from the profiler.

    CUDA: every GPU kernel CUPTI records (memcpy/memset included); those whose name marks them as
    inductor's are "generated". CPU: inductor's kernel events, and every ATen operator that is not
    in `_NO_KERNEL` and calls no such operator itself (the innermost operator that does the work:
    `bmm`, not the two `resolve_conj` it calls; `native_batch_norm`, whose only children allocate):
    in eager code these are the launching operators, in compiled code the extern kernels the
    generated code calls.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        gpu = [e.name for e in events if e.device_type == DeviceType.CUDA]
        generated = sum(1 for name in gpu if _is_generated_kernel(name))
        return generated, len(gpu) - generated
    generated = sum(1 for e in events if _is_generated_kernel(e.name))
    roots = [e for e in events if e.cpu_parent is None and e.device_type == DeviceType.CPU]
    return generated, sum(_cpu_launches(e) for e in roots)


def _cpu_launches(event: Any) -> int:
    """ATen operators in `event`'s subtree that do work themselves (see `count_launches`).

    A foreach operator counts once: the CPU loops over its tensors, CUDA runs one multi-tensor
    kernel, and the CPU count stands for what the same step launches on a GPU.
    """
    if event.name.startswith("aten::_foreach_"):
        return 1
    inner = sum(_cpu_launches(child) for child in event.cpu_children)
    if inner or not event.name.startswith("aten::"):
        return inner
    return int(event.name not in _NO_KERNEL)


class _Memory:
    """Peak memory of a block of steps: (absolute peak, rise over the start), in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_peak = device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK)
        self.libc = _libc()
        self.start = 0

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.cpu_peak:
            if self.libc is not None:
                self.libc.malloc_trim(0)  # give freed heap pages back, so RSS is what is live
            self.start = _proc_status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def read(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.cpu_peak:
            peak = _proc_status_bytes("VmHWM")
        else:
            return float("nan"), float("nan")
        return peak, peak - self.start


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _pin_malloc(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold: large buffers come from and go back to the OS every time."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_MMAP_THRESHOLD, threshold)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def machine_description(device: torch.device) -> str:
    """CPU/GPU model, threads, library versions and the load at the time of the run."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    parts = [f"CPU {cpu} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"]
    if device.type == "cuda":
        parts.append(f"GPU {torch.cuda.get_device_name(device)}")
    parts.append(f"torch {torch.__version__}")
    if hasattr(os, "getloadavg"):
        load = " ".join(f"{v:.1f}" for v in os.getloadavg())
        parts.append(f"load average {load} at start")
    return ", ".join(parts)


class _Bench:
    """One model under test: its optimiser, precision context and training step."""

    def __init__(
        self, name: str, impl: str, model: nn.Module, cfg: DictConfig, device: torch.device
    ) -> None:
        self.name, self.impl = name, impl
        self.memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        self.model = model.to(device, memory_format=self.memory_format)
        # Fused SGD: one kernel for the whole update instead of ~5 per parameter tensor (3,460
        # launches for GUNN-15's 692 tensors); CUDA, and CPU since torch 2.4.
        fused = {"fused": True} if cfg.get("fused_optimizer", True) else {}
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, **fused
        )
        dtype = PRECISIONS[str(cfg.precision)]
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.compiled = self.model
        self.compile_s = float("nan")
        self.launches = 0
        self.kernels = (float("nan"), float("nan"))

    def compile(self, cfg: DictConfig, x: Tensor, y: Tensor, sync: Callable[[], None]) -> None:
        """Compile in place (regionally) and time the first two steps (CUDA graphs record on
        the second) less two steady ones."""
        compile_regions(self.model, mode=cfg.compile_mode, backend=cfg.compile_backend)
        times = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            self.step(x, y)
            sync()
            times.append(time.perf_counter() - start)
        self.compile_s = times[0] + times[1] - 2 * times[2]

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = F.cross_entropy(self.compiled(x), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def count_ops(self, x: Tensor, y: Tensor) -> int:
        """ATen ops dispatched by one training step (run before the model is compiled)."""
        with _OpCounter() as counter:
            self.step(x, y)
        return counter.count


def _build(cfg: DictConfig, device: torch.device) -> list[_Bench]:
    """The configured model once per implementation (same initial weights), then the yardstick."""
    probe = instantiate(cfg.model)
    has_gunn = any(isinstance(m, GunnLayer) for m in probe.modules())
    impls = list(cfg.impls) if has_gunn else ["-"]
    benches = []
    for impl in impls:
        model = instantiate(cfg.model, impl=impl) if has_gunn else probe
        model.load_state_dict(probe.state_dict())
        benches.append(_Bench(cfg.model.name, impl, model, cfg, device))
    if cfg.yardstick:
        yard = create_model(
            cfg.yardstick, num_classes=cfg.data.num_classes, in_chans=cfg.data.in_chans
        )
        benches.append(_Bench(cfg.yardstick, "-", yard, cfg, device))
    return benches


def _batch(
    cfg: DictConfig, device: torch.device, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    size, chans, n = cfg.data.image_size, cfg.data.in_chans, cfg.batch_size
    x = torch.randn(n, chans, size, size, generator=generator).to(device)
    y = torch.randint(0, cfg.data.num_classes, (n,), generator=generator).to(device)
    return x, y


def run(cfg: DictConfig) -> tuple[list[Row], str]:
    """Measure every model of the config; returns the rows and the machine description."""
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        _pin_malloc()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    machine = machine_description(device)
    torch.manual_seed(cfg.seed)
    benches = _build(cfg, device)
    x, y = _batch(cfg, device, torch.Generator().manual_seed(cfg.seed))
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def inputs() -> Tensor:
        # On-device per-sample augmentation of the batch, timed as part of the step.
        return augment(x, generator=aug_gen) if cfg.augment else x

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    # Eager counts first, then (compile=true) compile in place and count the compiled step.
    for b in benches:
        b.ops = b.count_ops(inputs(), y)
        b.launches = sum(count_launches(partial(b.step, inputs(), y), device))
    if cfg.compile:
        if cfg.get("compile_cold", True):
            # A fresh inductor cache: compile_s is a first compile, not a cache hit of a rerun.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")
        if device.type == "cpu":  # name inductor's C++ kernels in the profiler
            torch._inductor.config.cpp.enable_kernel_profile = True
        for b in benches:
            b.compile(cfg, inputs(), y, sync)
            b.kernels = count_launches(partial(b.step, inputs(), y), device)
    memory = _Memory(device)
    for b in benches:
        for _ in range(cfg.warmup):
            b.step(inputs(), y)
    times: dict[int, list[float]] = {i: [] for i in range(len(benches))}
    peaks: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(benches))}
    for r in range(cfg.repeats):
        order = list(range(len(benches)))
        order = order[r % len(order) :] + order[: r % len(order)]
        for i in order:
            memory.reset()
            sync()
            start = time.perf_counter()
            for _ in range(cfg.steps):
                benches[i].step(inputs(), y)
            sync()
            times[i].append((time.perf_counter() - start) / cfg.steps)
            peaks[i].append(memory.read())

    rows = []
    one_image = x[:1]
    for i, b in enumerate(benches):
        step = statistics.median(times[i])
        peak = statistics.median(p for p, _ in peaks[i])
        rise = statistics.median(d for _, d in peaks[i])
        with b.autocast():
            act = saved_activation_bytes(b.model, x) / len(x)
        rows.append(
            Row(
                model=b.name,
                impl=b.impl,
                device=device.type,
                precision=str(cfg.precision),
                batch_size=len(x),
                images_per_s=len(x) / step,
                step_ms=step * 1e3,
                peak_mb=peak / _MB,
                step_peak_mb=rise / _MB,
                act_mb_per_image=act / _MB,
                ops_per_step=b.ops,
                launches_per_step=b.launches,
                compile_s=b.compile_s,
                compiled_kernels=sum(b.kernels),
                compiled_generated=b.kernels[0],
                compiled_extern=b.kernels[1],
                gmacs_per_image=count_macs(b.model, one_image) / 1e9,
                params_m=count_params(b.model) / 1e6,
            )
        )
    _add_ratios(rows)
    return rows, machine


def _add_ratios(rows: list[Row]) -> None:
    plain = next((r for r in rows if r.impl == PLAIN), None)
    if plain is None:
        return
    for r in rows:
        r.time_vs_plain = r.step_ms / plain.step_ms
        r.step_peak_vs_plain = r.step_peak_mb / plain.step_peak_mb
        r.peak_vs_plain = r.peak_mb / plain.peak_mb
        r.act_vs_plain = r.act_mb_per_image / plain.act_mb_per_image


COLUMNS = [f.name for f in fields(Row)]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def markdown(rows: list[Row], machine: str, command: str) -> str:
    """The rows as a Markdown table headed by the machine and the command that produced it."""
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    body = "\n".join("| " + " | ".join(_fmt(v) for v in asdict(r).values()) + " |" for r in rows)
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"Measured {when} on {machine}.\n\n`{command}`\n\n{head}\n{body}\n"


def write(
    rows: list[Row], machine: str, command: str, out_dir: Path, name: str
) -> tuple[Path, Path]:
    """Write `<name>.csv` and `<name>.md` under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md_path.write_text(markdown(rows, machine, command))
    return csv_path, md_path


def main(cfg: DictConfig, command: str) -> list[Row]:
    """Run, print and save the benchmark of `cfg` (the Hydra entry point's body)."""
    rows, machine = run(cfg)
    name = cfg.output.name or f"{cfg.model.name}_{rows[0].device}_{cfg.precision}"
    csv_path, md_path = write(rows, machine, command, Path(cfg.output.dir), name)
    print(markdown(rows, machine, command))
    print(f"wrote {csv_path} and {md_path}")
    return rows
