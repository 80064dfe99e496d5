"""Activation memory of a training step, measured rather than estimated.

A training-mode forward runs under `torch.autograd.graph.saved_tensors_hooks` that account every
tensor autograd keeps for backward (custom Functions' `save_for_backward` included), each storage
once, parameters excluded. It depends on the model's current GUNN implementation: `reference` keeps
every concatenated z_i, `recompute` almost nothing. The model's mode, BatchNorm statistics and
gradients are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from gunn_exp.analysis.memory import PeakMemory


class _SavedTensorTracker:
    """Pack/unpack hooks that account the bytes autograd holds for backward, storage by storage.

    Every packed tensor is wrapped in a `_Held` handle; when autograd drops the handle (after
    backward used it) the storage's count goes down, so `live` follows what is held at any moment
    and `peak` is its maximum, recomputation inside backward included.
    """

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def pack(self, t: Tensor) -> object:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.excluded or storage.nbytes() == 0:
            return t
        if ptr not in self.refs:
            self.refs[ptr] = 0
            self.sizes[ptr] = storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr] += 1
        return _Held(self, ptr, t)

    @staticmethod
    def unpack(packed: object) -> Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed  # type: ignore[return-value]

    def release(self, ptr: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            self.live -= self.sizes.pop(ptr)
            del self.refs[ptr]


class _Held:
    """A saved tensor plus a callback to its tracker when autograd lets go of it."""

    def __init__(self, tracker: _SavedTensorTracker, ptr: int, tensor: Tensor) -> None:
        self.tracker, self.ptr, self.tensor = tracker, ptr, tensor

    def __del__(self) -> None:
        self.tracker.release(self.ptr)


@contextmanager
def _training_step(model: nn.Module) -> Iterator[None]:
    """Training mode for a measurement, leaving no trace: mode, buffers and grads are restored."""
    was_training = model.training
    buffers = [b.clone() for b in model.buffers()]
    grads = [p.grad for p in model.parameters()]
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g


def _track_training_step(model: nn.Module, x: Tensor, backward: bool) -> tuple[int, int]:
    """(bytes held for backward after the forward, most held at any moment) for one step."""
    tracker = _SavedTensorTracker({p.untyped_storage().data_ptr() for p in model.parameters()})
    hooks = torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack)
    with _training_step(model), hooks:
        out = model(x)
        after_forward = tracker.live
        if backward:
            out.float().sum().backward()
        del out
    return after_forward, tracker.peak


def saved_activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes autograd holds for backward after one training-mode forward of the batch `x`."""
    return _track_training_step(model, x, backward=False)[0]


def peak_saved_bytes(model: nn.Module, x: Tensor) -> int:
    """Most bytes held for backward at any moment of a training forward + backward of `x`.

    Exceeds `saved_activation_bytes` only for implementations that recompute in backward and
    save the recomputed tensors through autograd again.
    """
    return _track_training_step(model, x, backward=True)[1]


def cuda_peak_bytes(model: nn.Module, x: Tensor) -> int:
    """Peak CUDA memory a training forward + backward of `x` adds to what was allocated before.

    Measured by the CUDA caching allocator: activations, workspaces and the gradients.
    """
    memory = PeakMemory(x.device)
    memory.reset()
    with _training_step(model):
        model(x).float().sum().backward()
    return int(memory.read()[1])
