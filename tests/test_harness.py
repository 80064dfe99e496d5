"""The measurement toolkit's harness and table renderer (gunn_exp.analysis.harness, .tables)."""

from __future__ import annotations

import math

import torch
from torch import nn

from gunn_exp.analysis.harness import TrainingStep, time_interleaved
from gunn_exp.analysis.tables import markdown_table

CPU = torch.device("cpu")


def test_training_step_updates_the_model() -> None:
    torch.manual_seed(0)
    step = TrainingStep(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), CPU, optimizer="loop")
    before = [p.detach().clone() for p in step.model.parameters()]
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    assert step.warm_up(x, y) > 0
    assert math.isnan(step.compile_s)  # eager: nothing compiled
    after = list(step.model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_interleaved_timing_rotates_and_keeps_going_after_a_failure() -> None:
    calls: list[str] = []

    def ok(name: str) -> None:
        calls.append(name)

    def broken() -> None:
        calls.append("b")
        raise RuntimeError("out of memory")

    timings = time_interleaved([lambda: ok("a"), broken, lambda: ok("c")], CPU, repeats=3, calls=1)
    # Repeat r starts at step r; the broken one runs once and is left out afterwards.
    assert calls == ["a", "b", "c", "c", "a", "c", "a"]
    assert [len(t.seconds) for t in timings] == [3, 0, 3]
    assert isinstance(timings[1].error, RuntimeError)
    assert timings[0].step_s >= 0 and math.isnan(timings[1].step_s)


def test_markdown_table_formats_numbers_and_alignment() -> None:
    rows = [["gunn15", 6315.4, 0.06693, 7895], ["yardstick", 10.08, 1.0, 353]]
    assert markdown_table(["model", "img/s", "ratio", "kernels"], rows).splitlines() == [
        "| model | img/s | ratio | kernels |",
        "|---|---|---|---|",
        "| gunn15 | 6,315 | 0.0669 | 7895 |",
        "| yardstick | 10.1 | 1 | 353 |",
    ]
    assert markdown_table(["a", "b", "c"], [], text_columns=1).splitlines()[1] == "|---|---:|---:|"
