"""Export a trained run to TorchScript and ONNX (export.py), for serving without this package.

The exported graphs map a float32 batch (N x C x H x W, N free) preprocessed as recorded in
`preprocessing.json` to logits; `classes.json` names the outputs. Both files are copied beside the
models. GUNN layers are switched to the `reference` implementation first: every implementation
computes the same function with the same weights, and only the reference one is plain tensor ops
(the memory-light ones are custom autograd Functions that tracing cannot see through).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from gunn_exp import rundir
from gunn_exp.inference.run import Run
from gunn_exp.models import GunnLayer

TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
INPUT, OUTPUT = "images", "logits"
# PyTorch deprecates TorchScript in favour of torch.export; the issue asks for it (libtorch and
# mobile runtimes still load it), so its deprecation notice is not repeated on every export.
JIT_DEPRECATED = "`torch.jit.* is deprecated"


def plain_ops(model: nn.Module) -> nn.Module:
    """Make every GUNN layer use the traceable reference implementation (same outputs)."""
    for module in model.modules():
        if isinstance(module, GunnLayer):
            module.impl = "reference"
    return model


def example_input(run: Run, batch: int = 2) -> Tensor:
    pre = run.preprocessing
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, pre.in_chans, pre.crop, pre.crop, generator=generator)


def export_torchscript(model: nn.Module, example: Tensor, path: Path) -> Path:
    """Trace `model` (eval mode) on `example`; the batch size stays free in the traced graph."""
    with warnings.catch_warnings():
        # Shape checks inside the model become constants of the trace: right for this input
        # layout, which preprocessing.json fixes.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", JIT_DEPRECATED)
        traced = torch.jit.trace(model, example)
    traced.save(str(path))
    return path


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Path:
    """torch.export-based ONNX export with a dynamic batch dimension, weights inside the file."""
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        input_names=[INPUT],
        output_names=[OUTPUT],
        dynamic_shapes=({0: batch},),
        external_data=False,
        verbose=False,
    )
    return path


def export_run(
    run: Run, out_dir: Path, formats: tuple[str, ...] = ("torchscript", "onnx")
) -> list[Path]:
    """Write the requested formats plus preprocessing.json and classes.json into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = plain_ops(run.model).cpu().eval()
    example = example_input(run)
    written = []
    if "torchscript" in formats:
        written.append(export_torchscript(model, example, out_dir / TORCHSCRIPT))
    if "onnx" in formats:
        written.append(export_onnx(model, example, out_dir / ONNX))
    written.append(run.preprocessing.save(out_dir))
    written.append(rundir.write_json(out_dir / rundir.CLASSES, run.classes, sort_keys=False))
    return written


@torch.no_grad()
def max_differences(model: nn.Module, out_dir: Path, x: Tensor) -> dict[str, float]:
    """Largest absolute logit difference of each exported file in `out_dir` from `model` on `x`."""
    expected = model.cpu().eval()(x)
    diffs = {}
    if (out_dir / TORCHSCRIPT).is_file():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", JIT_DEPRECATED)
            scripted = torch.jit.load(str(out_dir / TORCHSCRIPT))
        diffs[TORCHSCRIPT] = (scripted(x) - expected).abs().max().item()
    if (out_dir / ONNX).is_file():
        import onnxruntime  # optional dependency (the `export` extra)

        session = onnxruntime.InferenceSession(
            str(out_dir / ONNX), providers=["CPUExecutionProvider"]
        )
        (logits,) = session.run([OUTPUT], {INPUT: x.numpy()})
        diffs[ONNX] = (torch.from_numpy(logits) - expected).abs().max().item()
    return diffs
