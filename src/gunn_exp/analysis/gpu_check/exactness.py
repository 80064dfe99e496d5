"""Part 1 of the GPU check: every GUNN layer implementation against `reference` on the device."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gunn_exp.analysis.gpu_check.plan import Plan
from gunn_exp.analysis.gpu_check.report import one_line
from gunn_exp.models import GunnLayer
from gunn_exp.models.compile import compile_regions
from gunn_exp.models.layer import DEFAULT_IMPL, IMPLEMENTATIONS

# float32: every implementation must match `reference` to this (TF32 off; only summation order
# differs). bf16 autocast: the implementations round at other points than autograd does, so they
# are held to bf16 rounding itself: their error against the float32 reference may be at most
# BF16_FACTOR times the bf16 reference's own error against it (plus BF16_FLOOR).
FP32_TOL = 1e-4
BF16_FACTOR = 2.0
BF16_FLOOR = 1e-3

GROUPS = ("output", "grad x", "grad params", "BN stats")


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


def _group_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """Largest `_rel_err` per group of tensors (output, input grad, parameter grads, BN stats)."""
    errs = dict.fromkeys(GROUPS, 0.0)
    for name, value in got.items():
        group = name if name in errs else "grad params" if name.startswith("grad") else "BN stats"
        errs[group] = max(errs[group], _rel_err(value, ref[name]))
    return errs


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
        run = partial(_run_impl, state, update, x.contiguous(memory_format=fmt), grad)

        with _exact_float32(device):
            ref = run("reference", None)
            tols = dict.fromkeys(GROUPS, FP32_TOL)
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
                    rows.append({**row, "ok": f"error: {one_line(err)}"})
                    failures.append(f"{label} {precision} {update}: {one_line(err)}")
                    continue
                bad = {g: f"{errs[g]:.3g} > {tols[g]:.3g}" for g in GROUPS if errs[g] > tols[g]}
                tolerance = (
                    f"{FP32_TOL:g}"
                    if dtype is None
                    else "≤ " + " / ".join(f"{tols[g]:.2g}" for g in GROUPS)
                )
                rows.append({**row, **errs, "tolerance": tolerance, "ok": not bad})
                if bad:
                    failures.append(f"{label} {precision} {update}: {bad}")
    return {
        "layer": f"GunnLayer(C={channels}, K={segments}), input {batch}x{channels}x{size}^2",
        "rows": rows,
        "failures": failures,
    }
