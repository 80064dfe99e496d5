"""Per-sample CIFAR train augmentation of docs/SPEC.md §3 on a whole batch, on whatever device it
lives.

For normalised images the authors' order is: horizontal flip (p = 1/2), random crop back to the
input size from the image zero-padded by `padding` pixels on each side, then the Jigsaw shift
(p = 1/3 nothing, else a cyclic roll by d ~ U{1..size} along the width or the height, 1/2 each,
like `gunn_exp.data.transforms.Jigsaw`, i.e. `torch.roll(img, d, dim)`).

Every sample draws its own parameters (batched torchvision transforms would apply one crop to the
whole batch). All three steps only move pixels, so they compose into one source index per output
pixel: the batch is augmented by a single `gather` plus a mask for the padding, with no Python loop
over samples and no padded copy of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Jigsaw axis codes, as drawn by `Jigsaw` in transforms.py.
NO_SHIFT, SHIFT_WIDTH, SHIFT_HEIGHT = 0, 1, 2


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample draws, each a length-N integer tensor on the batch's device.

    flip: 1 to mirror horizontally. top, left: crop corner in the padded image (0..2*padding).
    axis: NO_SHIFT, SHIFT_WIDTH or SHIFT_HEIGHT. shift: roll distance d (1..size of that axis).
    """

    flip: Tensor
    top: Tensor
    left: Tensor
    axis: Tensor
    shift: Tensor


def draw_params(
    n: int,
    height: int,
    width: int,
    padding: int = 4,
    flip: bool = True,
    jigsaw: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> AugmentParams:
    """Draw the augmentation of `n` samples of `height` x `width` images.

    Disabled steps draw their identity (no flip, centre crop, no shift), so `apply_params` needs
    no flags. `generator` must live on `device` (CUDA generators for CUDA draws).
    """

    def randint(low: int, high: int) -> Tensor:
        return torch.randint(low, high, (n,), generator=generator, device=device)

    zeros = torch.zeros(n, dtype=torch.long, device=device)
    axis = randint(0, 3) if jigsaw else zeros
    shift = torch.where(axis == SHIFT_HEIGHT, randint(1, height + 1), randint(1, width + 1))
    return AugmentParams(
        flip=randint(0, 2) if flip else zeros,
        top=randint(0, 2 * padding + 1),
        left=randint(0, 2 * padding + 1),
        axis=axis,
        shift=torch.where(axis == NO_SHIFT, 0, shift),
    )


def apply_params(images: Tensor, params: AugmentParams, padding: int = 4) -> Tensor:
    """Flip, pad-and-crop and roll each image of an (N, C, H, W) batch by its own `params`."""
    n, c, h, w = images.shape
    device = images.device
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    # Output pixel (y, x) <- cropped pixel rolled back by the shift ...
    dy = torch.where(params.axis == SHIFT_HEIGHT, params.shift, 0)[:, None]
    dx = torch.where(params.axis == SHIFT_WIDTH, params.shift, 0)[:, None]
    cy = (ys[None, :] - dy) % h
    cx = (xs[None, :] - dx) % w
    # ... <- padded pixel at the crop corner ... <- (possibly mirrored) source pixel.
    sy = cy + params.top[:, None] - padding
    sx = cx + params.left[:, None] - padding
    valid = ((sy >= 0) & (sy < h))[:, :, None] & ((sx >= 0) & (sx < w))[:, None, :]
    sx = torch.where(params.flip[:, None].bool(), w - 1 - sx, sx)
    index = sy.clamp(0, h - 1)[:, :, None] * w + sx.clamp(0, w - 1)[:, None, :]  # (N, H, W)
    out = images.reshape(n, c, h * w).gather(2, index.view(n, 1, h * w).expand(n, c, h * w))
    return out.view(n, c, h, w) * valid[:, None].to(images.dtype)


def augment(
    images: Tensor,
    padding: int = 4,
    flip: bool = True,
    jigsaw: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw and apply the docs/SPEC.md §3 train augmentation to a normalised (N, C, H, W) batch."""
    n, _, h, w = images.shape
    params = draw_params(n, h, w, padding, flip, jigsaw, generator, images.device)
    return apply_params(images, params, padding)
