"""Overlap-singularity diagnostics: is a network near the singularities the paper says GUNN removes?

Wei, Zhang, Cousseau, Ozeki & Amari (Neural Computation 2008) name the singular regions where
gradient learning plateaus: *overlap* (two units with the same incoming weights, so only their
summed outgoing weight matters) and *elimination* (a unit switched off). Orhan & Pitkow (ICLR 2018)
add linear dependence among units and read degeneracy off the loss Hessian's spectrum. GUNN's
claim (Qiao et al. 2018) is that ordering the segment updates removes overlap singularities: in
the simultaneous update (SUNN) two segment functions G_i, G_j with equal parameters give equal
increments G_i(x) = G_j(x); in the gradual update they read different inputs z_i, z_j.

A *site* is a GUNN layer, a gunnified residual block (models/gunnify.py) or a plain residual block
gunnify recognises. Per site, on a fixed probe batch (`probe_statistics`):

- weight overlap `w_cos_*`: |cosine| between output filters that read the same input channels
  (every G_i's first conv together, each later conv within its G_i);
- increment overlap `inc_corr_*`: |correlation| between channels of the increments
  Delta_i = G_i(z_i) of *different* segments (a block without segments, K = 1 or a plain block,
  counts each channel as its own segment);
- hidden overlap `hid_corr_*`: |correlation| between the hidden (post-ReLU) channels of one G_i;
- linear dependence: effective rank `erank` (exp of the entropy of the normalised eigenvalues;
  Roy & Vetterli 2007) and participation ratio `pr` of the site output's channel covariance;
- elimination: `dead_relu`, the fraction of hidden ReLU channels that are 0 on >= 99% of the
  probe's positions, and `small_gamma`, the fraction of the site's BatchNorm gammas with
  |gamma| < `gamma_eps`.

`*` is `mean` and `max` over the pairs, and `n90`, `n99`: how many pairs exceed 0.9 and 0.99.
Correlations treat each channel as a variable and the probe's images x positions as samples.

The loss Hessian's extreme eigenvalues and near-zero mass come from Lanczos on Hessian-vector
products (`hessian_spectrum`: `torch.func`, forward-over-reverse; no PyHessian, which is GPL).

Pure functions of models and tensors: the training callback (training/singularity.py) and any
analysis use the same code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from gunn_exp.models.gunnify import (
    OPTIONAL_NOOPS,
    BlockParts,
    GradualBlock,
    Layout,
    block_layout,
    branch_filters,
)
from gunn_exp.models.layer import GunnLayer

THRESHOLDS = (0.9, 0.99)  # the n90 / n99 pair counts
DEAD_FRACTION = 0.99  # a ReLU channel is dead when it is 0 on at least this fraction of positions
# Pairs whose |correlation| the matrix product puts above this are recomputed from the rows'
# difference, in float64: exactly 1 for equal rows, which float32 matmul rounding would hide.
_NEAR_ONE = 1.0 - 1e-4


# --- pair statistics ---------------------------------------------------------------------------


def abs_correlations(rows: Tensor, center: bool = True) -> Tensor:
    """|Pearson correlation| (`center`) or |cosine| between the rows of `rows` (P x M), (P, P).

    Constant rows (zero after centring) give NaN. Equal rows, or one the negation of the other,
    give exactly 1.0: near 1 the value is 1 - min(|u - v|^2, |u + v|^2) / 2 of the normalised
    rows u, v in float64, which is 0 difference for equal rows.
    """
    x = rows.float()
    if center:
        x = x - x.mean(dim=1, keepdim=True)
    unit = x / x.norm(dim=1, keepdim=True)  # 0 / 0 = NaN for constant rows
    corr = (unit @ unit.T).abs().double().clamp(max=1.0)
    near = torch.nonzero(corr > _NEAR_ONE)
    for chunk in near.split(256):  # bounded memory: 256 pairs x M samples at a time
        u, v = unit[chunk[:, 0]].double(), unit[chunk[:, 1]].double()
        gap = torch.minimum((u - v).pow(2).sum(1), (u + v).pow(2).sum(1))
        corr[chunk[:, 0], chunk[:, 1]] = 1.0 - gap / 2
    return corr


def channel_rows(activation: Tensor, max_samples: int | None = None) -> Tensor:
    """(N, C, H, W) -> (C, N*H*W): one row per channel, images x positions as samples; at most
    `max_samples` of them, a fixed random choice (the same samples for every channel, call and
    run; its own seeded generator, the global RNG untouched)."""
    n, c = activation.shape[:2]
    flat = activation.reshape(n, c, -1)
    if max_samples is None or flat.shape[0] * flat.shape[2] <= max_samples:
        return flat.transpose(0, 1).reshape(c, -1)
    chosen = _sample_positions(n * flat.shape[2], max_samples).to(activation.device)
    image, position = chosen // flat.shape[2], chosen % flat.shape[2]
    return flat[image, :, position].T  # gathers only the chosen samples


@functools.cache
def _sample_positions(total: int, count: int) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(total, generator=generator)[:count].sort().values


def summarize_pairs(values: Tensor, prefix: str) -> dict[str, float]:
    """`<prefix>_mean`, `_max`, `_n90`, `_n99` of the pair values (NaN pairs left out; mean and
    max NaN when no pair is left)."""
    values = values[~values.isnan()]
    if values.numel() == 0:
        stats = {f"{prefix}_mean": math.nan, f"{prefix}_max": math.nan}
    else:
        stats = {f"{prefix}_mean": float(values.mean()), f"{prefix}_max": float(values.max())}
    for t in THRESHOLDS:
        stats[f"{prefix}_n{round(100 * t)}"] = float((values > t).sum())
    return stats


def upper_pairs(matrix: Tensor, groups: Tensor | None = None, across: bool = True) -> Tensor:
    """The values of `matrix` above the diagonal; with `groups` (a group id per row) only pairs
    of different groups (`across`) or of the same group (not `across`)."""
    keep = torch.ones_like(matrix, dtype=torch.bool).triu(1)
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        keep &= ~same if across else same
    return matrix[keep]


def weight_overlap(filter_groups: list[Tensor]) -> dict[str, float]:
    """`w_cos_*`: |cosine| between the filters of each group (pairs within a group)."""
    pairs = [upper_pairs(abs_correlations(w.detach(), center=False)) for w in filter_groups]
    return summarize_pairs(torch.cat(pairs) if pairs else torch.empty(0), "w_cos")


def increment_overlap(increments: list[Tensor], max_samples: int | None = None) -> dict[str, float]:
    """`inc_corr_*`: |correlation| between channels of different segments' increments (one
    increment: each channel its own segment), over at most `max_samples` positions."""
    rows = torch.cat([channel_rows(d, max_samples) for d in increments])
    if len(increments) > 1:
        groups = torch.cat(
            [torch.full((d.shape[1],), i, device=rows.device) for i, d in enumerate(increments)]
        )
    else:
        groups = torch.arange(rows.shape[0], device=rows.device)
    return summarize_pairs(upper_pairs(abs_correlations(rows), groups), "inc_corr")


def hidden_overlap(hidden: list[list[Tensor]], max_samples: int | None = None) -> dict[str, float]:
    """`hid_corr_*`: |correlation| between hidden channels of the same activation of one G_i,
    over at most `max_samples` positions."""
    pairs = [
        upper_pairs(abs_correlations(channel_rows(h, max_samples))) for unit in hidden for h in unit
    ]
    return summarize_pairs(torch.cat(pairs) if pairs else torch.empty(0), "hid_corr")


def covariance_spectrum(activation: Tensor) -> Tensor:
    """Eigenvalues (ascending, >= 0, float64) of the channel covariance of (N, C, H, W), over
    every sample (the product in the activation's precision, at least float32)."""
    x = channel_rows(activation)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    x = x - x.mean(dim=1, keepdim=True)
    cov = (x @ x.T).double() / max(x.shape[1] - 1, 1)
    return torch.linalg.eigvalsh(cov).clamp(min=0.0)


def effective_rank(eigenvalues: Tensor) -> float:
    """exp(entropy of eigenvalues / their sum) (Roy & Vetterli 2007): r for r equal nonzero
    eigenvalues, between 1 and r otherwise; NaN when all are 0."""
    total = eigenvalues.sum()
    if total <= 0:
        return math.nan
    p = eigenvalues[eigenvalues > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(eigenvalues: Tensor) -> float:
    """(sum of eigenvalues)^2 / sum of their squares: r for r equal nonzero eigenvalues."""
    squares = eigenvalues.pow(2).sum()
    return float(eigenvalues.sum() ** 2 / squares) if squares > 0 else math.nan


def dead_fraction(hidden: list[list[Tensor]]) -> float:
    """Fraction of hidden ReLU channels that are 0 on >= DEAD_FRACTION of their positions."""
    active = [channel_rows(h).gt(0).float().mean(dim=1) for unit in hidden for h in unit]
    if not active:
        return math.nan
    return float((torch.cat(active) <= 1 - DEAD_FRACTION).float().mean())


def small_gamma_fraction(site: nn.Module, eps: float) -> float:
    """Fraction of the BatchNorm gammas inside `site` with |gamma| < eps."""
    gammas = [m.weight.detach().abs() for m in site.modules() if isinstance(m, _BatchNorm)]
    gammas = [g for g in gammas if g is not None]
    if not gammas:
        return math.nan
    return float((torch.cat(gammas) < eps).float().mean())


# --- sites: where the statistics are taken ------------------------------------------------------


def singularity_sites(model: nn.Module) -> dict[str, nn.Module]:
    """The model's GUNN layers, gunnified blocks and plain residual blocks (the ones gunnify
    recognises and whose extras this module can run: only a downsample path), by qualified name,
    in forward order. Sites do not nest."""
    sites: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{site}.") for site in sites):
            continue
        if isinstance(module, GunnLayer | GradualBlock) or _plain_layout(module) is not None:
            sites[name] = module
    return sites


def _plain_layout(block: nn.Module) -> Layout | None:
    layout = block_layout(block)
    if layout is None:
        return None
    children = dict(block.named_children())
    extras = [n for n in OPTIONAL_NOOPS if n not in ("downsample", "shortcut")]
    if any(
        children.get(n) is not None and not isinstance(children[n], nn.Identity) for n in extras
    ):
        return None
    return layout


@torch.no_grad()
def gunn_layer_parts(layer: GunnLayer, x: Tensor) -> BlockParts:
    """The GUNN layer's update rule (docs/SPEC.md §1, `reference_update`), with each
    Delta_i = G_i(z_i) and G_i's two hidden ReLU outputs. Without autograd, z_i is one buffer
    updated in place (segment i written after G_i has read it), not K concatenations."""
    xs = list(x.split(layer.width, dim=1))
    state = x.clone()  # z_i: y_1 .. y_{i-1}, x_i .. x_K
    increments, hidden = [], []
    for i, unit in enumerate(layer.units):
        h1, h2, delta = unit.parts(x if layer.update == "simultaneous" else state)
        state[:, i * layer.width : (i + 1) * layer.width] = xs[i] + delta
        increments.append(delta)
        hidden.append([h1, h2])
    return BlockParts(state, increments, hidden)


def plain_block_parts(block: nn.Module, layout: Layout, x: Tensor) -> BlockParts:
    """A plain residual block's forward pass, taken apart: one increment F(x), its hidden
    activations, act(shortcut(x) + F(x))."""
    act = getattr(block, layout.out_act) if layout.out_act else nn.Identity()
    if layout.branch is not None:
        delta = getattr(block, layout.branch)(x)
        return BlockParts(act(x + delta), [delta], [])
    h, hidden = x, []
    for conv, norm, inner in layout.layers:
        h = getattr(block, norm)(getattr(block, conv)(h))
        if inner is not None:
            h = getattr(block, inner)(h)
            hidden.append(h)
    shortcut = x
    for name in ("downsample", "shortcut"):
        if getattr(block, name, None) is not None:
            shortcut = getattr(block, name)(x)
    return BlockParts(act(shortcut + h), [h], [hidden])


def site_parts(site: nn.Module, x: Tensor) -> BlockParts:
    """One forward pass of a site, taken apart (same function as the site's forward)."""
    if isinstance(site, GunnLayer):
        return gunn_layer_parts(site, x)
    if isinstance(site, GradualBlock):
        return site.parts(x)
    layout = _plain_layout(site)
    assert layout is not None, f"{type(site).__name__} is not a singularity site"
    return plain_block_parts(site, layout, x)


def site_filters(site: nn.Module) -> list[Tensor]:
    """The site's filter groups for `weight_overlap`."""
    if isinstance(site, GunnLayer):
        first = torch.cat([u.conv_in.weight.flatten(1) for u in site.units])
        mids = [u.conv_mid.weight.flatten(1) for u in site.units]
        return [first, *mids, *(u.conv_out.weight.flatten(1) for u in site.units)]
    if isinstance(site, GradualBlock):
        return site.filters()
    layout = _plain_layout(site)
    assert layout is not None
    return branch_filters(site, layout)


def site_statistics(
    site: nn.Module, parts: BlockParts, gamma_eps: float = 1e-2, max_samples: int | None = None
) -> dict[str, float]:
    """Every statistic of the module docstring for one site and its recorded forward pass
    (correlations over at most `max_samples` positions, the covariance over all)."""
    spectrum = covariance_spectrum(parts.output)
    return {
        **weight_overlap(site_filters(site)),
        **increment_overlap(parts.increments, max_samples),
        **hidden_overlap(parts.hidden, max_samples),
        "erank": effective_rank(spectrum),
        "pr": participation_ratio(spectrum),
        "dead_relu": dead_fraction(parts.hidden),
        "small_gamma": small_gamma_fraction(site, gamma_eps),
    }


# --- the probe: one forward pass that changes nothing ------------------------------------------


@contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Whatever runs inside leaves `model` and the random number generators as they were:
    every buffer (BatchNorm running statistics and counters), every module's train/eval mode and
    `track_running_stats`, GUNN layers' implementation, and the CPU and CUDA RNG states."""
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.is_cuda})
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    impls = [(m, m.impl, m.impl_options) for m in model.modules() if isinstance(m, GunnLayer)]
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            for module, training in modes:
                module.training = training
            for module, track in tracking:
                module.track_running_stats = track
            for layer, impl, options in impls:
                layer.impl, layer.impl_options = impl, options


def batchnorm_train_mode(model: nn.Module) -> None:
    """BatchNorm in training mode (batch statistics), everything else (dropout) in eval mode."""
    for module in model.modules():
        module.training = isinstance(module, _BatchNorm)


@contextmanager
def _recording(sites: dict[str, nn.Module], record: Callable[[str, nn.Module, Tensor], Tensor]):
    """Run each site through `record(name, site, x)` (which returns the site's output)."""
    for name, site in sites.items():
        site.forward = functools.partial(record, name, site)  # instance attribute: this call only
    try:
        yield
    finally:
        for site in sites.values():
            del site.forward


@torch.no_grad()
def probe_statistics(
    model: nn.Module, images: Tensor, gamma_eps: float = 1e-2, max_samples: int | None = 4096
) -> dict[str, float]:
    """The statistics of every site (`<site>/<stat>`) on `images`, from one forward pass with
    BatchNorm in training mode on the whole probe batch and dropout off; `model`, its buffers and
    the RNGs are left exactly as they were (`preserved`). Correlations use at most `max_samples`
    of the images x positions (`channel_rows`). Each site's tensors are reduced to numbers as soon
    as it has run, so memory holds one site's activations at a time."""
    sites = singularity_sites(model)
    stats: dict[str, float] = {}

    def record(name: str, site: nn.Module, x: Tensor) -> Tensor:
        parts = site_parts(site, x)
        for key, value in site_statistics(site, parts, gamma_eps, max_samples).items():
            stats[f"{name}/{key}"] = value
        return parts.output

    with preserved(model), _recording(sites, record):
        batchnorm_train_mode(model)
        model.forward(images)  # not model(...): a model compiled whole runs eagerly here
    return stats


# --- the loss Hessian: Hessian-vector products and Lanczos --------------------------------------


@contextmanager
def functional_ready(model: nn.Module) -> Iterator[None]:
    """`model` made fit for torch.func transforms for the duration: BatchNorm normalises with
    batch statistics without touching its buffers, dropout is off, GUNN layers run the plain
    `reference` rule (the fast ones are autograd Functions without forward-mode rules)."""
    with ExitStack() as stack:
        stack.enter_context(preserved(model))
        batchnorm_train_mode(model)
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.track_running_stats = False
            elif isinstance(module, GunnLayer):
                module.impl, module.impl_options = "reference", {}
        yield


def flat_loss(
    model: nn.Module, images: Tensor, labels: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(theta -> loss, theta): the mean cross-entropy of `model` on (images, labels) as a
    function of its trainable parameters flattened into one vector, and their current values.
    Call it inside `functional_ready(model)`."""
    named = [(n, p.detach()) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.reshape(-1) for _, p in named])

    def loss(flat: Tensor) -> Tensor:
        chunks = flat.split([math.prod(s) for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        logits = torch.func.functional_call(model, params, (images,))
        return F.cross_entropy(logits, labels)

    return loss, theta


def loss_hvp(
    model: nn.Module, images: Tensor, labels: Tensor
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """(v -> H v, theta): the Hessian of `flat_loss` at theta as a product with a flat vector
    (forward-over-reverse: the jvp of the gradient). Call it inside `functional_ready(model)`."""
    loss, theta = flat_loss(model, images, labels)
    gradient = torch.func.grad(loss)

    def hvp(v: Tensor) -> Tensor:
        return torch.func.jvp(gradient, (theta,), (v,))[1]

    return hvp, theta


@dataclass
class Spectrum:
    """Lanczos' Ritz values (ascending) and their weights (squared first components of the
    tridiagonal's eigenvectors, summing to 1): a quadrature of the spectral density seen from
    the start vector (stochastic Lanczos quadrature, Ghorbani et al. 2019)."""

    ritz: Tensor
    weights: Tensor

    def near_zero(self, rel: float = 1e-3) -> float:
        """Weight of the Ritz values with |theta| <= rel * max |theta|: the estimated fraction of
        eigenvalues near 0 (exact in expectation over random start vectors)."""
        scale = self.ritz.abs().max()
        return float(self.weights[self.ritz.abs() <= rel * scale].sum())


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    breakdown: float = 1e-10,
) -> Spectrum:
    """`steps` Lanczos iterations of the symmetric operator `matvec` from `start`, with full
    reorthogonalisation (twice, against every basis vector: no ghost eigenvalues). Stops early
    when the Krylov space is exhausted (the residual below `breakdown` times the largest
    |alpha|, beta seen). With steps >= the dimension the Ritz values are the eigenvalues of the
    operator that the start vector reaches."""
    basis = [start / start.norm()]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = start.new_zeros(())
    for step in range(min(steps, start.numel())):
        w = matvec(basis[-1])
        alpha = torch.dot(w, basis[-1])
        alphas.append(alpha)
        w = w - alpha * basis[-1] - (betas[-1] * basis[-2] if betas else 0)
        q = torch.stack(basis)
        for _ in range(2):
            w = w - q.T @ (q @ w)
        beta = w.norm()
        scale = torch.maximum(scale, torch.maximum(alpha.abs(), beta))
        if step == steps - 1 or beta <= breakdown * scale:
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        tridiagonal = tridiagonal + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vectors = torch.linalg.eigh(tridiagonal)
    return Spectrum(ritz, vectors[0].pow(2))


def hessian_spectrum(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    steps: int = 20,
    vectors: int = 1,
    seed: int = 0,
    near_zero_rel: float = 1e-3,
) -> dict[str, float]:
    """`hessian/max`, `hessian/min` (extreme Ritz values) and `hessian/near_zero` (the mean
    near-zero weight) of the loss Hessian by Lanczos from `vectors` random start vectors (drawn
    from a generator seeded with `seed`: the global RNG is not touched). Leaves `model` as it
    was."""
    with functional_ready(model):
        hvp, theta = loss_hvp(model, images, labels)
        generator = torch.Generator(device=theta.device).manual_seed(seed)
        spectra = [
            lanczos(
                hvp,
                torch.randn(theta.shape, generator=generator, device=theta.device).to(theta.dtype),
                steps,
            )
            for _ in range(vectors)
        ]
    return {
        "hessian/max": max(float(s.ritz[-1]) for s in spectra),
        "hessian/min": min(float(s.ritz[0]) for s in spectra),
        "hessian/near_zero": sum(s.near_zero(near_zero_rel) for s in spectra) / len(spectra),
    }
