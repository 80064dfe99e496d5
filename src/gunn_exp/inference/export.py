"""Export a trained run (export.py): TorchScript and ONNX for serving without this package, and
plain weights (safetensors) for PyTorch and timm.

`safetensors` writes `model.safetensors` (the network's state dict, keys without the training
module's `model.` prefix) and `config.json` in the Hugging Face layout timm reads: the
architecture, the arguments that rebuild it (`model_args`) and its pretrained cfg (the registered
one, updated with the run's class names and preprocessing). The folder then loads with
`create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`, timm's
`load_checkpoint`, `timm.create_model("local-dir:<folder>", pretrained=True)` and
`gunn_exp.timm.from_pretrained`.

The exported graphs map a float32 batch (N x C x H x W, N free) preprocessed as recorded in
`preprocessing.json` to logits; `classes.json` names the outputs. Both files are copied beside the
models. GUNN layers are switched to the `reference` implementation first: every implementation
computes the same function with the same weights, and only the reference one is plain tensor ops
(the memory-light ones are custom autograd Functions that tracing cannot see through).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gunn_exp import rundir
from gunn_exp.inference.run import Run
from gunn_exp.models import GunnLayer, create_model
from gunn_exp.models.registry import pretrained_cfgs

TORCHSCRIPT = "model.ts"
ONNX = "model.onnx"
SAFETENSORS = "model.safetensors"
CONFIG = "config.json"
FORMATS = ("torchscript", "onnx", "safetensors")
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


@torch.no_grad()
def pretrained_cfg(run: Run) -> dict[str, Any]:
    """timm's pretrained cfg of the run's weights: the model's registered cfg (the tag named
    after the run's dataset if there is one) with the run's classes and preprocessing."""
    cfgs = pretrained_cfgs(run.model_name)
    cfg = cfgs.get(run.preprocessing.dataset, next(iter(cfgs.values())))
    pre = run.preprocessing
    grey = len(pre.mean) == 1  # one grey value replicated to in_chans channels
    size = (pre.in_chans, pre.crop, pre.crop)
    pool = run.model.forward_features(torch.zeros(1, *size, device=run.device)).shape[-2:]
    cfg.update(
        num_classes=run.model.num_classes,
        label_names=list(run.classes),
        input_size=size,
        pool_size=tuple(pool),
        crop_pct=pre.crop / pre.resize,
        interpolation=getattr(pre, "interpolation", "bilinear"),
        mean=pre.mean * pre.in_chans if grey else pre.mean,
        std=pre.std * pre.in_chans if grey else pre.std,
    )
    cfg.pop("architecture", None)
    cfg.pop("tag", None)
    return cfg


def export_safetensors(run: Run, out_dir: Path) -> list[Path]:
    """model.safetensors (plain state dict) and config.json (see the module docstring)."""
    from safetensors.torch import save

    model = run.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    rundir.atomic_write(out_dir / SAFETENSORS, save(state, metadata={"format": "pt"}))
    config = {
        "architecture": run.model_name,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool.pool_type,
        "model_args": {k: v for k, v in run.model_args.items() if v is not None},
        "pretrained_cfg": pretrained_cfg(run),
    }
    rundir.write_json(out_dir / CONFIG, config, sort_keys=False)
    return [out_dir / SAFETENSORS, out_dir / CONFIG]


def load_safetensors_export(out_dir: Path) -> nn.Module:
    """The model of an export folder, built from its config.json with its weights (eval mode)."""
    config = json.loads((out_dir / CONFIG).read_text())
    return create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={**config["pretrained_cfg"], "file": str(out_dir / SAFETENSORS)},
        **config["model_args"],
    ).eval()


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
    if "safetensors" in formats:
        written += export_safetensors(run, out_dir)
    written.append(run.preprocessing.save(out_dir))
    written.append(rundir.write_classes(run.classes, out_dir))
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
    if (out_dir / SAFETENSORS).is_file():
        diffs[SAFETENSORS] = (load_safetensors_export(out_dir)(x) - expected).abs().max().item()
    return diffs
