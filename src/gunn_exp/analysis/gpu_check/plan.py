"""Sizes and time budgets of the GPU check's parts: on a GPU, or the tiny CPU version."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

MODES = ("eager", "compile", "compile+cudagraphs")


@dataclass(frozen=True)
class Plan:
    """Every part's sizes; the defaults are the GPU check's (one H100/H200, about 8 minutes)."""

    gpu: bool = True
    # Part 1: one GUNN layer (channels, segments) on a (batch, size, size) input: GUNN-15's first
    # stage.
    layer: tuple[int, int, int, int] = (240, 20, 8, 32)
    # Part 2: `model` with each of `impls` in each of `modes`, beside `yardstick`, at each batch
    # size; `repeats` interleaved blocks of `steps` steps.
    model: str = "gunn15"
    batches: tuple[int, ...] = (64, 256)
    impls: tuple[str, ...] = ("reference", "keep_convs", "recompute")
    modes: tuple[str, ...] = MODES
    backend: str = "inductor"
    yardstick: str = "resnet18_cifar"
    image_size: int = 32
    steps: int = 10
    repeats: int = 5
    # Part 3: model, image size, batch.
    large: tuple[str, int, int] = ("gunn18", 224, 64)
    # Part 4: train.py on `e2e_batches_per_epoch` batches of a generated CIFAR-10.
    e2e_model: str = "gunn_mini"
    e2e_batch: int = 64
    e2e_batches_per_epoch: int = 20
    e2e_compile: bool = True
    # Part 5: runs packed on one device (counts), each training `model` at this batch (the CIFAR
    # recipe's), timed over the same window.
    pack_runs: tuple[int, ...] = (1, 2, 4, 8)
    pack_batch: int = 64
    pack_window_s: float = 6.0
    # Seconds per part; about 8 minutes in all, plus imports and the report.
    budgets: dict[str, float] = field(
        default_factory=lambda: {
            "exactness": 30,
            "throughput": 240,
            "large": 30,
            "end_to_end": 130,
            "packing": 100,
        }
    )


GPU_PLAN = Plan()

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
    image_size=16,
    steps=1,
    repeats=2,
    large=("gunn18", 64, 2),
    e2e_batch=8,
    e2e_batches_per_epoch=3,
    e2e_compile=False,
    pack_runs=(1, 2),
    pack_batch=4,
    pack_window_s=1.0,
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
