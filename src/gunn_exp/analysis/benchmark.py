"""Training-step benchmark of the GUNN layer implementations, with a ResNet-18 yardstick (issue 4).

`run(cfg)` builds the configured model once per implementation in `cfg.impls` (same weights), plus
the yardstick, and measures each on the same random batch of the data config's shape:

- step time (zero_grad, forward, cross-entropy, backward, SGD step) and images/s: `repeats` timed
  blocks of `steps` steps, models interleaved in a rotating order within each repeat, median
  (`harness.time_interleaved`);
- peak memory of those steps (`memory.PeakMemory`): on CUDA `max_memory_allocated` (absolute,
  and above what was allocated before the step); on CPU the process's peak RSS and its rise over
  the RSS before the block;
- activation bytes autograd saves for backward per image (`activations.saved_activation_bytes`);
- ATen ops dispatched per training step (forward, backward, optimizer), counted eagerly, and the
  kernels one eager step launches (`kernels.count_launches`: ATen operators that run work, views
  and allocations excluded; on CUDA the GPU kernels the profiler records);
- with `compile=true`: the models are compiled regionally (`gunn_exp.models.compile`), and the
  compile time and the kernels of one compiled step are reported: inductor's generated kernels
  and the extern ATen kernels (convolutions, matrix products) its code calls;
- multiply-adds per image (`complexity.count_macs`) and parameters;
- every quantity's ratio to the plain implementation ("reference").

Sizes are in MB of 2**20 bytes (`units.MB`). Results go to `<output.dir>/<name>.csv` and `.md`.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import asdict, astuple, dataclass, fields
from datetime import datetime
from functools import partial
from pathlib import Path

import torch
import torch._inductor.config
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor

from gunn_exp.analysis.activations import saved_activation_bytes
from gunn_exp.analysis.complexity import count_macs, count_params
from gunn_exp.analysis.harness import TrainingStep, time_interleaved
from gunn_exp.analysis.kernels import LaunchCounter, count_launches
from gunn_exp.analysis.machine import describe, machine, resolve_device
from gunn_exp.analysis.memory import pin_malloc
from gunn_exp.analysis.tables import markdown_table
from gunn_exp.analysis.units import MB
from gunn_exp.data.gpu_augment import augment
from gunn_exp.models import GunnLayer, create_model

PLAIN = "reference"
PRECISIONS = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Row:
    """One benchmarked model; sizes in MB (2**20 bytes), times in ms."""

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


@dataclass
class _Model:
    """One model under test: its training step and what was counted of it."""

    name: str
    impl: str
    step: TrainingStep
    ops: int = 0
    launches: int = 0
    kernels: tuple[float, float] = (float("nan"), float("nan"))


def _build(cfg: DictConfig, device: torch.device) -> list[_Model]:
    """The configured model once per implementation (same initial weights), then the yardstick."""
    options = {
        "precision": PRECISIONS[str(cfg.precision)],
        "channels_last": bool(cfg.channels_last),
        "optimizer": "fused" if cfg.get("fused_optimizer", True) else "default",
    }
    probe = instantiate(cfg.model)
    has_gunn = any(isinstance(m, GunnLayer) for m in probe.modules())
    impls = list(cfg.impls) if has_gunn else ["-"]
    models = []
    for impl in impls:
        model = instantiate(cfg.model, impl=impl) if has_gunn else probe
        model.load_state_dict(probe.state_dict())
        models.append(_Model(cfg.model.name, impl, TrainingStep(model, device, **options)))
    if cfg.yardstick:
        yard = create_model(
            cfg.yardstick, num_classes=cfg.data.num_classes, in_chans=cfg.data.in_chans
        )
        models.append(_Model(cfg.yardstick, "-", TrainingStep(yard, device, **options)))
    return models


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
        pin_malloc()  # before anything is allocated: the same allocator rules for every model
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.cudnn_benchmark)
    machine_line = describe(machine(device))
    torch.manual_seed(cfg.seed)
    models = _build(cfg, device)
    x, y = _batch(cfg, device, torch.Generator().manual_seed(cfg.seed))
    x = x.contiguous(memory_format=torch.channels_last) if cfg.channels_last else x
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def inputs() -> Tensor:
        # On-device per-sample augmentation of the batch, timed as part of the step.
        return augment(x, generator=aug_gen) if cfg.augment else x

    # Eager counts first (augmentation outside them), then (compile=true) compile in place and
    # count the compiled step.
    for m in models:
        batch, counter = inputs(), LaunchCounter()
        with counter:
            m.step(batch, y)
        m.ops = counter.total
        m.launches = sum(count_launches(partial(m.step, inputs(), y), device))
    if cfg.compile:
        if cfg.get("compile_cold", True):
            # A fresh inductor cache: compile_s is a first compile, not a cache hit of a rerun.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_cold_")
        if device.type == "cpu":  # name inductor's C++ kernels in the profiler
            torch._inductor.config.cpp.enable_kernel_profile = True
        for m in models:
            m.step.compile(cfg.compile_mode, cfg.compile_backend)
            m.step.warm_up(inputs(), y)
            m.kernels = count_launches(partial(m.step, inputs(), y), device)

    def train(m: _Model) -> None:
        m.step(inputs(), y)

    for m in models:
        for _ in range(cfg.warmup):
            train(m)
    steps = [partial(train, m) for m in models]
    timings = time_interleaved(steps, device, repeats=cfg.repeats, calls=cfg.steps)
    for timing in timings:
        if timing.error is not None:
            raise timing.error

    rows = []
    one_image = x[:1]
    for m, timing in zip(models, timings, strict=True):
        with m.step.autocast():
            act = saved_activation_bytes(m.step.model, x) / len(x)
        rows.append(
            Row(
                model=m.name,
                impl=m.impl,
                device=device.type,
                precision=str(cfg.precision),
                batch_size=len(x),
                images_per_s=len(x) / timing.step_s,
                step_ms=timing.step_s * 1e3,
                peak_mb=timing.peak / MB,
                step_peak_mb=timing.rise / MB,
                act_mb_per_image=act / MB,
                ops_per_step=m.ops,
                launches_per_step=m.launches,
                compile_s=m.step.compile_s,
                compiled_kernels=sum(m.kernels),
                compiled_generated=m.kernels[0],
                compiled_extern=m.kernels[1],
                gmacs_per_image=count_macs(m.step.model, one_image) / 1e9,
                params_m=count_params(m.step.model) / 1e6,
            )
        )
    _add_ratios(rows)
    return rows, machine_line


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


def markdown(rows: list[Row], machine_line: str, command: str) -> str:
    """The rows as a Markdown table headed by the machine and the command that produced it."""
    when = datetime.now().strftime("%Y-%m-%d %H:%M")
    table = markdown_table(COLUMNS, [astuple(r) for r in rows])
    return (
        f"Measured {when} on {machine_line}.\n\n`{command}`\n\n"
        f"Sizes in MB of 2**20 bytes (MiB), times in ms.\n\n{table}\n"
    )


def write(
    rows: list[Row], machine_line: str, command: str, out_dir: Path, name: str
) -> tuple[Path, Path]:
    """Write `<name>.csv` and `<name>.md` under `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{name}.csv", out_dir / f"{name}.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    md_path.write_text(markdown(rows, machine_line, command))
    return csv_path, md_path


def main(cfg: DictConfig, command: str) -> list[Row]:
    """Run, print and save the benchmark of `cfg` (the Hydra entry point's body)."""
    rows, machine_line = run(cfg)
    name = cfg.output.name or f"{cfg.model.name}_{rows[0].device}_{cfg.precision}"
    csv_path, md_path = write(rows, machine_line, command, Path(cfg.output.dir), name)
    print(markdown(rows, machine_line, command))
    print(f"wrote {csv_path} and {md_path}")
    return rows
