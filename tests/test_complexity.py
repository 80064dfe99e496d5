"""Complexity report: the summarize.py entry point and the counting functions it is built on."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_entry
from torch import nn

from gunn_exp.analysis.activations import peak_saved_bytes, saved_activation_bytes
from gunn_exp.analysis.complexity import count_macs, count_params, stage_table, summarize
from gunn_exp.analysis.complexity_tables import markdown_summary
from gunn_exp.models import IMPLEMENTATIONS, create_model


def test_summarize_entry_point_reports_gunn15() -> None:
    out = run_entry("summarize.py", "model=gunn15", "data=cifar10").stdout
    assert "1,585,746" in out
    macs = int(re.search(r"Multiply-adds per image\D*([\d,]+)", out).group(1).replace(",", ""))
    assert abs(macs / 0.556e9 - 1) < 0.02  # docs/SPEC.md §2: about 0.556 G multiply-adds
    assert re.search(r"FLOPs per image \(2 x MACs\)\D*" + f"{2 * macs:,}", out)
    for stage in ("stem", "stage1", "stage2", "stage3", "head", "240x32x32", "360x8x8"):
        assert stage in out
    assert re.search(r"Saved for backward per image\s*\S*\s*[\d.]+ MiB", out)


def test_macs_of_known_layers() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, groups=2)  # each output reads 4 / 2 channels x 9 taps
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 25, 4))
    assert count_macs(model, torch.zeros(1, 4, 5, 5)) == 8 * 5 * 5 * 2 * 9 + 4 * 8 * 25


def hooked_macs(model: nn.Module, x: torch.Tensor) -> int:
    """The oracle: MACs of every Conv2d/Linear module call, from forward hooks (reference layout:
    a conv output element costs in_channels / groups x kernel taps, a Linear one in_features)."""
    total = 0

    def hook(module: nn.Module, _inputs: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.weight[0, 0].numel()
        else:
            total += out.numel() * module.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_every_implementation_counts_the_architecture_macs(impl: str) -> None:
    """FlopCounterMode sees the convolutions whichever implementation issues them (split, fused
    or recomputed): the count equals the module-by-module arithmetic of the reference layout."""
    x = torch.randn(2, 3, 16, 16)
    reference = hooked_macs(create_model("gunn_mini", impl="reference"), x)
    assert count_macs(create_model("gunn_mini", impl=impl), x) == reference


def test_stage_table_adds_up() -> None:
    model = create_model("gunn_mini")
    x = torch.randn(1, 3, 16, 16)
    rows = stage_table(model, x)
    assert [r.name for r in rows] == ["stem", "stage1", "stage2", "stage3", "head"]
    assert sum(r.params for r in rows) == count_params(model) == 119_050
    assert sum(r.macs for r in rows) == count_macs(model, x)
    assert [r.output_shape for r in rows][-2:] == [(64, 4, 4), (10,)]


def test_saved_bytes_of_a_linear_layer() -> None:
    """Linear keeps its input for the weight gradient; the weight itself is not an activation."""
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    assert saved_activation_bytes(model, x) == 2 * 4 * 4


def test_saved_bytes_measurement_leaves_no_trace() -> None:
    model = create_model("gunn_mini").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    saved = saved_activation_bytes(model, x)
    peak = peak_saved_bytes(model, x)
    assert 0 < saved <= peak
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_markdown_summary() -> None:
    model = create_model("gunn_mini")
    s = summarize(model, torch.randn(1, 3, 16, 16), "gunn_mini", "digits", activations=False)
    text = markdown_summary(s)
    assert "| Parameters | 119,050 |" in text
    assert "| stage3 | 55,168 |" in text
