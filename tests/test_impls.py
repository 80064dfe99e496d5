"""The fast GUNN layer implementations (models/whole_layer.py, models/recat.py) against the
"reference" oracle."""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gunn_exp.analysis.activations import saved_activation_bytes
from gunn_exp.models import IMPLEMENTATIONS, GunnLayer, create_model
from gunn_exp.models.layer import DEFAULT_IMPL
from gunn_exp.models.whole_layer import KEEP

ROOT = Path(__file__).resolve().parents[1]
FAST = sorted(set(IMPLEMENTATIONS) - {"reference"})
WHOLE_LAYER = sorted(KEEP)


def _pair(impl: str, update: str, projection: bool, dtype: torch.dtype = torch.float64):
    """A reference layer with non-trivial BN parameters and an identical copy using `impl`."""
    torch.manual_seed(0)
    ref = GunnLayer(12, 4, projection, update, impl="reference").to(dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    fast = copy.deepcopy(ref)
    fast.impl = impl
    return ref, fast


def _step(layer: GunnLayer, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad


def _assert_same(ref, fast, x, tol):
    g = torch.randn_like(x)
    y_ref, gx_ref = _step(ref, x, g)
    y, gx = _step(fast, x, g)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    for (name, p_ref), p in zip(ref.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, **tol, msg=name)


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("update", ["gradual", "simultaneous"])
@pytest.mark.parametrize("projection", [True, False])
def test_exact_outputs_grads_and_bn_buffers_float64(impl, update, projection):
    ref, fast = _pair(impl, update, projection)
    tight = {"rtol": 1e-10, "atol": 1e-10}
    for _ in range(3):  # training steps: BN normalises with batch statistics, updates buffers
        _assert_same(ref, fast, torch.randn(3, 12, 5, 5, dtype=torch.float64), tight)
    # Running statistics updated once per step, as by the reference (num_batches_tracked too).
    for (name, b_ref), b in zip(ref.named_buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-14, msg=name)
    ref.eval()
    fast.eval()
    _assert_same(ref, fast, torch.randn(2, 12, 4, 4, dtype=torch.float64), tight)


@pytest.mark.parametrize("impl", FAST)
def test_float32_close(impl):
    ref, fast = _pair(impl, "gradual", True, torch.float32)
    _assert_same(ref, fast, torch.randn(4, 12, 6, 6), {"rtol": 1e-4, "atol": 1e-4})


@pytest.mark.parametrize("impl", WHOLE_LAYER)
def test_channels_last_and_two_forwards_before_backward(impl):
    """NHWC activations, and gradient accumulation over two forwards (BN updated twice)."""
    ref, fast = _pair(impl, "gradual", True)
    x1, x2 = (torch.randn(3, 12, 5, 5, dtype=torch.float64) for _ in range(2))
    x1 = x1.to(memory_format=torch.channels_last)
    for layer in (ref, fast):
        (layer(x1) * 2 + layer(x2)).sum().backward()
    for p_ref, p in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-10)
    for b_ref, b in zip(ref.buffers(), fast.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", WHOLE_LAYER)
def test_bf16_autocast_matches_reference(impl):
    ref, fast = _pair(impl, "gradual", True, torch.float32)
    x = torch.randn(4, 12, 6, 6)
    g = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, gx_ref = _step(ref, x, g)
        y, gx = _step(fast, x, g)
    assert y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=5e-2, atol=5e-2 * gx_ref.abs().max().item())


def test_whole_layer_keeps_only_input_output_and_statistics():
    ref, fast = _pair("recompute", "gradual", True, torch.float32)
    x = torch.randn(4, 12, 8, 8)
    kept = saved_activation_bytes(fast, x)
    stats = 4 * 2 * (9 + 6 + 3) * 4  # 4 units x (mean, invstd) of BNs on 3o, 2o, o channels
    assert kept <= 2 * x.numel() * 4 + stats  # x and y only
    assert kept < saved_activation_bytes(ref, x) / 3


def test_default_impl_in_a_model_matches_reference():
    assert GunnLayer(8, 2).impl == DEFAULT_IMPL
    torch.manual_seed(0)
    fast = create_model("gunn_mini").double()
    ref = copy.deepcopy(fast)
    for layer in ref.gunn_layers():
        layer.impl = "reference"
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    t = torch.randint(0, 10, (4,))
    losses = [F.cross_entropy(m(x), t) for m in (ref, fast)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-10, atol=1e-10)
    for p_ref, p in zip(ref.parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-8, atol=1e-10)


def test_compile_fullgraph_default_impl():
    """The default implementation traces into one graph (no breaks); fwd and bwd match eager."""
    torch.manual_seed(0)
    model = create_model("gunn", widths=(8, 12), segments=(2, 3), stem_width=8)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for p_ref, p in zip(eager.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)
    for b_ref, b in zip(eager.buffers(), model.buffers(), strict=True):
        torch.testing.assert_close(b, b_ref)


def test_benchmark_script_writes_csv(tmp_path):
    cmd = [
        sys.executable,
        "benchmark.py",
        "model=gunn_mini",
        "data.image_size=8",
        "batch_size=2",
        "steps=2",
        "warmup=0",
        "repeats=1",
        "impls=[reference,recompute]",
        f"output.dir={tmp_path}",
        "output.name=tiny",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    with (tmp_path / "tiny.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["model"], r["impl"]) for r in rows] == [
        ("gunn_mini", "reference"),
        ("gunn_mini", "recompute"),
        ("resnet18_cifar", "-"),
    ]
    for column in (
        "images_per_s",
        "step_ms",
        "peak_mb",
        "act_mb_per_image",
        "ops_per_step",
        "gmacs_per_image",
        "time_vs_plain",
        "act_vs_plain",
    ):
        assert all(float(r[column]) > 0 for r in rows), column
    assert float(rows[1]["act_vs_plain"]) < 1
    assert (tmp_path / "tiny.md").read_text().count("| gunn_mini |") == 2
