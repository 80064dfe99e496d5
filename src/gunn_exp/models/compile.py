"""Regional compilation of GUNN models: `torch.compile` the repeated blocks, not the whole model.

A GUNN layer runs its K segment functions G_i one after another, so compiling a GUNN model as one
graph unrolls every segment of every layer (75 in GUNN-15): inductor then spends ~10 minutes on
one very large graph (docs/PERFORMANCE.md). But all G_i of a stage have the same shapes, and Dynamo
keys its cache on the code and the input shapes, not on the module instance (parameters are
graph inputs), so compiling each `GunnUnit` on its own compiles G_i once per shape (three in
GUNN-15, train and eval each) and reuses that code for the other units of the stage.

Which region is compiled depends on how the layer's implementation runs the units:
- implementations that call each unit as a module (`UNIT_IMPLS`, i.e. `reference`): every unit is
  compiled; the update loop (slicing, concatenation) stays in Python.
- the whole-layer autograd Functions (`SEGMENT_IMPLS`: `recompute`, `keep_in`, `keep_convs`) run
  G_i's forward and its backward as two segment functions: those are compiled
  (`whole_layer.compiled_ops`, set through `GunnLayer.impl_options`), once per shape for all layers.
  The per-layer bookkeeping (one clone, the segment writes, the batched BatchNorm affines) stays
  eager: a few operators per segment.
- `recat` never calls `GunnUnit.forward` and has no segment function, so its smallest
  compilable region is the layer: each layer is compiled whole (its K segments unrolled, slow to
  compile).
Everything outside the GUNN layers (stem, transitions, head) runs eagerly: a handful of ops.
A model without GUNN layers (e.g. the ResNet yardstick) is compiled whole.

Every region is compiled in place (`nn.Module.compile`), so state_dict keys do not change.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch import nn

from gunn_exp.models.layer import GunnLayer
from gunn_exp.models.whole_layer import KEEP

# Implementations whose update loop calls every GunnUnit as a module (see the module docstring).
UNIT_IMPLS = frozenset({"reference"})
# Implementations whose per-segment functions are compiled (the whole-layer Functions).
SEGMENT_IMPLS = frozenset(KEEP)

# Dynamo compiles a region's code at most this many times (per shape, train/eval, batch size)
# before it falls back to eager. Its default (8) is too small for one code object shared by the
# units of three stages, in training and in evaluation, with a smaller last batch.
RECOMPILE_LIMIT = 64


def compile_regions(
    model: nn.Module, mode: str | None = None, backend: str = "inductor"
) -> list[str]:
    """Compile `model`'s GUNN units, segment functions or layers in place (module docstring).

    Args:
        model: any image classifier; compiled whole when it has no GUNN layer.
        mode: torch.compile mode, e.g. "reduce-overhead" (CUDA graphs) or "max-autotune".
        backend: torch.compile backend ("inductor"; "aot_eager" to check tracing quickly).

    Returns:
        The qualified names of the compiled modules ("" for the whole model), a layer's name with
        ".segments" where its segment functions are compiled.
    """
    _raise_recompile_limit(RECOMPILE_LIMIT)
    # Static shapes: each shape gets its own specialised code, which is what CUDA graphs want and
    # what avoids dynamic-shape kernels after the second stage's shape is seen.
    options = {"mode": mode, "backend": backend, "dynamic": False}
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GunnLayer)]
    if not layers:
        model.compile(**options)
        return [""]
    compiled = []
    for name, layer in layers:
        if layer.impl in UNIT_IMPLS:
            for i, unit in enumerate(layer.units):
                unit.compile(**options)
                compiled.append(f"{name}.units.{i}")
        elif layer.impl in SEGMENT_IMPLS:
            layer.impl_options = {"compile": {"mode": mode, "backend": backend}}
            compiled.append(f"{name}.segments")
        else:
            layer.compile(**options)
            compiled.append(name)
    return compiled


def _raise_recompile_limit(limit: int) -> None:
    # `recompile_limit` is the newer name of `cache_size_limit` (torch >= 2.7 has both).
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, key, max(getattr(config, key), limit))
