"""The singularity diagnostics (models/diagnostics.py), each against a case whose answer is known
exactly: copied segment functions, duplicated hidden channels, the full Hessian, rank-r data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from gunn_exp.models import GunnLayer, create_model
from gunn_exp.models.diagnostics import (
    abs_correlations,
    covariance_spectrum,
    effective_rank,
    flat_loss,
    functional_ready,
    gunn_layer_parts,
    increment_overlap,
    lanczos,
    loss_hvp,
    participation_ratio,
    probe_statistics,
)


def copy_segment_function(layer: GunnLayer, source: int, target: int) -> None:
    """G_target := G_source (parameters and buffers)."""
    layer.units[target].load_state_dict(layer.units[source].state_dict())


@pytest.mark.parametrize("update", ["simultaneous", "gradual"])
def test_copied_segment_functions_overlap_exactly_only_in_sunn(update: str) -> None:
    """Copy G_1's parameters into G_3: in SUNN both read x, so their increments are bitwise
    equal and the increment overlap is exactly 1; in GUNN G_3 reads z_3 (G_1's update
    included), so they differ. The weights overlap exactly in both: only the activations tell
    the two updates apart."""
    torch.manual_seed(0)
    layer = GunnLayer(32, 4, update=update).train()
    copy_segment_function(layer, 1, 3)
    x = torch.randn(6, 32, 5, 5)
    with torch.no_grad():
        parts = gunn_layer_parts(layer, x)
        torch.testing.assert_close(parts.output, layer(x))  # the layer's own function
    stats = increment_overlap(parts.increments)
    if update == "simultaneous":
        assert torch.equal(parts.increments[1], parts.increments[3])
        assert stats["inc_corr_max"] == 1.0 and stats["inc_corr_n99"] >= 8  # o = 8 channels
    else:
        assert not torch.equal(parts.increments[1], parts.increments[3])
        assert stats["inc_corr_max"] < 0.99 and stats["inc_corr_n99"] == 0


@pytest.mark.parametrize("update", ["simultaneous", "gradual"])
def test_the_probe_sees_the_copy_through_the_whole_model(update: str) -> None:
    torch.manual_seed(0)
    model = create_model("gunn", widths=[32], segments=[4], update=update)
    copy_segment_function(model.stages[0].gunn1, 0, 2)
    stats = probe_statistics(model, torch.randn(8, 3, 8, 8))
    assert stats["stages.0.gunn1/w_cos_max"] == 1.0  # same filters in both updates
    if update == "simultaneous":
        assert stats["stages.0.gunn1/inc_corr_max"] == 1.0
    else:
        assert stats["stages.0.gunn1/inc_corr_max"] < 0.99


def test_the_probe_counts_dead_units_and_small_gammas_and_changes_nothing() -> None:
    torch.manual_seed(0)
    model = create_model("gunn", widths=[32], segments=[4]).train()
    images = torch.randn(8, 3, 8, 8)
    before = probe_statistics(model, images)
    unit = model.stages[0].gunn1.units[0]
    with torch.no_grad():
        unit.bn_in.bias[:4] = -1e3  # 4 of the first hidden layer's 16 channels: always < 0
        unit.bn_out.weight[:3] = 0.0  # 3 eliminated output channels
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    after = probe_statistics(model, images)
    hidden, gammas = 4 * (16 + 16), 4 * (24 + 16 + 8)  # per unit: 2o + 2o ReLUs; 3o + 2o + o BN
    site = "stages.0.gunn1"
    assert after[f"{site}/dead_relu"] == pytest.approx(before[f"{site}/dead_relu"] + 4 / hidden)
    assert after[f"{site}/small_gamma"] == pytest.approx(before[f"{site}/small_gamma"] + 3 / gammas)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN buffers too
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)


def test_abs_correlations() -> None:
    torch.manual_seed(0)
    rows = torch.randn(5, 200)
    rows[3] = rows[1]  # equal
    rows[4] = -rows[0]  # negated
    corr = abs_correlations(rows)
    np.testing.assert_allclose(corr.numpy(), np.abs(np.corrcoef(rows.numpy())), atol=1e-6)
    assert corr[1, 3] == 1.0 and corr[0, 4] == 1.0  # exactly, despite float32 products
    constant = abs_correlations(torch.stack([torch.ones(10), torch.randn(10)]))
    assert constant[0, 1].isnan()


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_effective_rank_and_participation_ratio_of_rank_r_data(rank: int) -> None:
    """Channels = orthonormal mixtures of r orthogonal equal-variance sources: the covariance
    has r equal nonzero eigenvalues, so both measures are exactly r; an unequal spectrum gives
    the entropy formula's value."""
    channels, n, h, w = 12, 4, 5, 5
    samples = n * h * w
    generator = torch.Generator().manual_seed(rank)
    mixing, _ = torch.linalg.qr(
        torch.randn(channels, rank, generator=generator, dtype=torch.float64)
    )
    sources = torch.randn(samples, rank, generator=generator, dtype=torch.float64)
    sources -= sources.mean(0)
    sources, _ = torch.linalg.qr(sources)  # orthonormal, centred columns
    rows = mixing @ sources.T  # (C, samples)
    activation = rows.reshape(channels, n, h, w).transpose(0, 1)
    spectrum = covariance_spectrum(activation)
    assert effective_rank(spectrum) == pytest.approx(rank, abs=1e-9)
    assert participation_ratio(spectrum) == pytest.approx(rank, abs=1e-9)
    if rank > 1:
        scaled = mixing @ torch.diag(torch.arange(1.0, rank + 1, dtype=torch.float64)) @ sources.T
        p = torch.arange(1.0, rank + 1, dtype=torch.float64) ** 2
        p /= p.sum()
        expected = math.exp(-(p * p.log()).sum())
        spectrum = covariance_spectrum(scaled.reshape(channels, n, h, w).transpose(0, 1))
        assert effective_rank(spectrum) == pytest.approx(expected, abs=1e-9)
        assert participation_ratio(spectrum) == pytest.approx(float(1 / (p**2).sum()), abs=1e-9)


class SmallNet(nn.Module):
    """Conv-BN-ReLU, Conv-BN-ReLU, global pool, Linear: 1,798 parameters with the defaults
    (1,750 with `norm=False`: no BatchNorm)."""

    def __init__(self, hidden: int = 12, mid: int = 12, classes: int = 10, norm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(hidden, mid, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid) if norm else nn.Identity()
        self.fc = nn.Linear(mid, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.fc(h.mean((2, 3)))


def hvp_along_duplicates(duplicate: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
    """(u'Hu, Hu, mask of the parameters Hu may touch) for u moving conv2's outgoing weights
    from hidden channel 0 to channel 1, in float64."""
    torch.manual_seed(0)
    net = SmallNet(hidden=6, mid=4, classes=3).double()
    with torch.no_grad():
        for p in (net.bn1.weight, net.bn1.bias):
            p.uniform_(0.5, 1.5)
        if duplicate:  # channel 1 := channel 0: same incoming weights, same BatchNorm
            net.conv1.weight[1] = net.conv1.weight[0]
            net.bn1.weight[1], net.bn1.bias[1] = net.bn1.weight[0], net.bn1.bias[0]
    images, labels = torch.randn(8, 3, 5, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    direction = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    delta = torch.randn(4, 3, 3, dtype=torch.float64)
    direction["conv2.weight"][:, 0], direction["conv2.weight"][:, 1] = delta, -delta
    touched = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    touched["conv1.weight"][:2] = touched["bn1.weight"][:2] = touched["bn1.bias"][:2] = True
    flat = lambda d: torch.cat([d[n].reshape(-1) for n, _ in net.named_parameters()])  # noqa: E731
    u = flat(direction)
    with functional_ready(net):
        hvp, _ = loss_hvp(net, images, labels)
        hu = hvp(u)
    return float(u @ hu), hu, flat(touched)


def test_hessian_is_flat_along_duplicated_hidden_channels() -> None:
    """Duplicated hidden channels: the network depends only on the sum of their outgoing
    weights, so moving weight from one to the other has zero curvature (u'Hu = 0) and changes
    no gradient except those of the two channels' own incoming parameters."""
    curvature, hu, touched = hvp_along_duplicates(duplicate=True)
    assert abs(curvature) < 1e-10
    assert hu[~touched].abs().max() < 1e-10
    assert hu[touched].abs().max() > 1e-4  # Hu itself is not 0: the test is not vacuous
    curvature, _, _ = hvp_along_duplicates(duplicate=False)
    assert abs(curvature) > 1e-4


def test_lanczos_matches_the_full_hessian() -> None:
    """Lanczos on Hessian-vector products against eigvalsh of torch.func.hessian, on a network
    of 1,750 parameters in float64: the extreme eigenvalues to 1e-8, every Ritz value an
    eigenvalue to 1e-8. (No BatchNorm here: torch.func.hessian, which vmaps the backward pass,
    is wrong for training-mode batch_norm in torch 2.14; the next test checks that case.)"""
    torch.manual_seed(0)
    net = SmallNet(norm=False).double()
    assert sum(p.numel() for p in net.parameters()) == 1750
    # Two images: a Hessian of rank ~450, which Lanczos exhausts in as many steps.
    images, labels = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randint(0, 10, (2,))
    with functional_ready(net):
        loss, theta = flat_loss(net, images, labels)
        eigenvalues = torch.linalg.eigvalsh(torch.func.hessian(loss)(theta))
        hvp, _ = loss_hvp(net, images, labels)
        start = torch.randn(theta.shape, generator=torch.Generator().manual_seed(1))
        spectrum = lanczos(hvp, start.double(), steps=theta.numel())
    assert spectrum.ritz[-1] == pytest.approx(float(eigenvalues[-1]), abs=1e-8)
    assert spectrum.ritz[0] == pytest.approx(float(eigenvalues[0]), abs=1e-8)
    gaps = (spectrum.ritz[:, None] - eigenvalues[None, :]).abs().min(dim=1).values
    assert gaps.max() < 1e-8
    assert spectrum.weights.sum() == pytest.approx(1.0)


def test_hessian_vector_products_with_training_mode_batchnorm() -> None:
    """With BatchNorm normalising by batch statistics, H v (forward-over-reverse) equals
    PyTorch's double-backward Hessian-vector product."""
    torch.manual_seed(0)
    net = SmallNet(hidden=6, mid=6).double()
    images, labels = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randint(0, 10, (6,))
    with functional_ready(net):
        loss, theta = flat_loss(net, images, labels)
        hvp, _ = loss_hvp(net, images, labels)
        for seed in range(3):
            v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(seed)).double()
            expected = torch.autograd.functional.hvp(loss, theta, v)[1]
            torch.testing.assert_close(hvp(v), expected, rtol=0, atol=1e-10)
