"""On-device CIFAR augmentation (gpu_augment) and the on-device loader, checked on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gunn_exp.data.device_loader import DeviceLoader
from gunn_exp.data.gpu_augment import (
    NO_SHIFT,
    SHIFT_HEIGHT,
    SHIFT_WIDTH,
    AugmentParams,
    apply_params,
    augment,
    draw_params,
)


def reference_transform(img: torch.Tensor, params: AugmentParams, j: int, padding: int):
    """Sample j's augmentation written out step by step (the oracle): flip, pad + crop, roll."""
    _, h, w = img.shape
    if params.flip[j]:
        img = img.flip(-1)
    top, left = int(params.top[j]), int(params.left[j])
    img = F.pad(img, (padding,) * 4)[:, top : top + h, left : left + w]
    axis, shift = int(params.axis[j]), int(params.shift[j])
    if axis == SHIFT_WIDTH:
        img = torch.roll(img, shift, -1)
    elif axis == SHIFT_HEIGHT:
        img = torch.roll(img, shift, -2)
    return img


@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (16, 2, 7, 12)])
def test_each_sample_equals_the_per_sample_transform(shape):
    images = torch.randn(shape)
    g = torch.Generator().manual_seed(0)
    params = draw_params(shape[0], shape[2], shape[3], padding=4, generator=g)
    out = apply_params(images, params, padding=4)
    assert out.shape == images.shape
    for j in range(shape[0]):
        torch.testing.assert_close(
            out[j], reference_transform(images[j], params, j, 4), rtol=0, atol=0
        )


def test_draws_cover_the_spec_distribution():
    n, size = 60_000, 32
    p = draw_params(n, size, size, padding=4, generator=torch.Generator().manual_seed(1))
    # flip p = 1/2; crop corner uniform over 0..8; Jigsaw: each of none / W / H with p = 1/3.
    assert abs(p.flip.float().mean().item() - 0.5) < 0.01
    for corner in (p.top, p.left):
        counts = torch.bincount(corner, minlength=9)
        assert len(counts) == 9 and (counts - n / 9).abs().max() < 0.05 * n / 9
    counts = torch.bincount(p.axis, minlength=3)
    assert len(counts) == 3 and (counts - n / 3).abs().max() < 0.03 * n / 3
    assert (p.shift[p.axis == NO_SHIFT] == 0).all()
    shifted = p.shift[p.axis != NO_SHIFT]
    assert shifted.min() == 1 and shifted.max() == size  # d ~ U{1..32}
    counts = torch.bincount(shifted, minlength=size + 1)[1:]
    assert (counts - len(shifted) / size).abs().max() < 0.15 * len(shifted) / size


def test_disabled_steps_and_padding_is_zero():
    images = torch.randn(200, 3, 8, 8) + 5  # no zeros inside the images
    p = draw_params(
        200, 8, 8, padding=2, flip=False, jigsaw=False, generator=torch.Generator().manual_seed(2)
    )
    assert (p.flip == 0).all() and (p.axis == NO_SHIFT).all()
    out = apply_params(images, p, padding=2)
    # A crop shifted by (dy, dx) from the centre shows |dy| zero rows and |dx| zero columns.
    for j in range(200):
        dy, dx = abs(int(p.top[j]) - 2), abs(int(p.left[j]) - 2)
        assert int((out[j] == 0).all(0).sum()) == 8 * (dy + dx) - dy * dx


def test_augment_is_reproducible_with_a_generator():
    images = torch.randn(8, 3, 32, 32)
    a = augment(images, generator=torch.Generator().manual_seed(3))
    b = augment(images, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_device_loader_epochs_normalisation_and_sharding():
    n, mean, std = 100, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(n)
    plain = DeviceLoader(images, labels, 32, mean, std, device="cpu", train=False, drop_last=False)
    assert len(plain) == 4
    x, y = next(iter(plain))
    expected = (images[:32].float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
        std
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, labels[:32])

    loader = DeviceLoader(images, labels, 32, mean, std, device="cpu", seed=7, channels_last=True)
    assert len(loader) == 3  # drop_last
    epoch0 = [y for _, y in loader]
    epoch1 = [y for _, y in loader]
    assert not torch.equal(torch.cat(epoch0), torch.cat(epoch1))  # reshuffled per epoch
    assert len(torch.cat(epoch0).unique()) == 96  # a permutation, without repeats
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for (_, a), b in zip(loader, epoch0, strict=True))
    loader.sampler.set_epoch(1)  # what Lightning calls before each epoch
    assert all(torch.equal(a, b) for (_, a), b in zip(loader, epoch1, strict=True))

    shards = [
        DeviceLoader(images, labels, 10, mean, std, device="cpu", rank=r, world_size=2)
        for r in range(2)
    ]
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 50
    assert not set(seen[0].tolist()) & set(seen[1].tolist())  # disjoint shards


def test_device_loader_state_resumes_mid_epoch_with_the_same_batches():
    """What Lightning does on a mid-epoch resume: a fresh loader gets the saved state_dict, then
    set_epoch; it yields the rest of that epoch, images (augmentation included) and labels."""
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(64)

    def make() -> DeviceLoader:
        return DeviceLoader(images, labels, 8, (0.5,) * 3, (0.25,) * 3, device="cpu", seed=3)

    loader = make()
    loader.set_epoch(1)
    full = list(loader)
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for (x, y), (x_ref, y_ref) in zip(rest, full[3:], strict=True):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)
    assert len(list(resumed)) == len(full)  # the next epoch is whole again
