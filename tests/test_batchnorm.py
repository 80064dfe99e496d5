"""Every GUNN implementation under every kind of BatchNorm, `reference` the oracle (issue 11).

One value per channel, frozen (torchvision's and timm's FrozenBatchNorm2d), eval-mode BatchNorm in
a training model, BatchNorm subclasses and untracked BatchNorm, and SyncBatchNorm across two real
gloo processes on CPU against one process running `reference` with plain BatchNorm on the whole
batch.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from gunn_exp.models import IMPLEMENTATIONS, GunnLayer, create_model
from gunn_exp.models.whole_layer import KEEP

IMPLS = sorted(IMPLEMENTATIONS)
TIGHT = {"rtol": 1e-9, "atol": 1e-10}


def randomised_layer(seed: int = 0) -> GunnLayer:
    """A float64 training-mode layer with non-trivial parameters and running statistics."""
    torch.manual_seed(seed)
    layer = GunnLayer(12, 4, projection=True, impl="reference").double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return layer


def step(layer: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Output and input gradient of one forward/backward with output gradient `g`."""
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(g)
    return y.detach(), x.grad


def assert_matches_reference(layer: GunnLayer, impl: str, steps: int = 2) -> None:
    """`layer` computed with `impl` equals `reference`: outputs, all gradients, all buffers."""
    oracle = copy.deepcopy(layer)
    layer.impl, oracle.impl = impl, "reference"
    for _ in range(steps):
        x = torch.randn(3, 12, 5, 4, dtype=torch.float64)
        g = torch.randn_like(x)
        for a, b in zip(step(layer, x, g), step(oracle, x, g), strict=True):
            torch.testing.assert_close(a, b, **TIGHT)
    named = dict(oracle.named_parameters())
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, **TIGHT, msg=name)
    buffers = dict(oracle.named_buffers())
    assert buffers.keys() == dict(layer.named_buffers()).keys()
    for name, b in layer.named_buffers():
        torch.testing.assert_close(b, buffers[name], rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------------------------
# One value per channel


@pytest.mark.parametrize("impl", IMPLS)
def test_one_value_per_channel_raises_like_reference(impl: str) -> None:
    """gunn_mini at 4x4 on one image: the last GUNN layer sees 1x1, BatchNorm can't normalise."""
    x = torch.randn(1, 3, 4, 4)
    messages = []
    for name in ("reference", impl):
        torch.manual_seed(0)
        model = create_model("gunn_mini", impl=name).train()
        messages.append(_message(model, x))
        running_vars = [m.running_var for m in model.modules() if hasattr(m, "running_var")]
        assert all(torch.isfinite(v).all() for v in running_vars), "NaN written before the error"
    assert messages[0].startswith("Expected more than 1 value per channel when training")
    assert messages[1] == messages[0]


def _message(model: nn.Module, x: Tensor) -> str:
    try:
        model(x)
    except ValueError as err:
        return str(err)
    raise AssertionError("no error raised")


@pytest.mark.parametrize("impl", IMPLS)
def test_one_value_per_channel_is_fine_in_eval(impl: str) -> None:
    model = create_model("gunn_mini", impl=impl).eval()
    assert torch.isfinite(model(torch.randn(1, 3, 4, 4))).all()


# --------------------------------------------------------------------------------------------
# Frozen, eval-mode, subclassed and untracked BatchNorm


class DoubledBatchNorm2d(nn.BatchNorm2d):
    """A subclass with its own forward: the whole-layer Function must not compute it as BN."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def _replace_bns(layer: GunnLayer, make) -> None:  # noqa: ANN001
    for unit in layer.units:
        for name in ("bn_in", "bn_mid", "bn_out"):
            setattr(unit, name, make(getattr(unit, name)))


def _torchvision_frozen(bn: nn.BatchNorm2d) -> nn.Module:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps).to(bn.weight.dtype)
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(frozen, key).copy_(getattr(bn, key).detach())
    return frozen


def _subclass(bn: nn.BatchNorm2d) -> nn.Module:
    new = DoubledBatchNorm2d(bn.num_features).double()
    new.load_state_dict(bn.state_dict())
    return new


def _untracked(bn: nn.BatchNorm2d) -> nn.Module:
    new = nn.BatchNorm2d(bn.num_features, track_running_stats=False).double()
    new.weight.data.copy_(bn.weight.data)
    new.bias.data.copy_(bn.bias.data)
    return new


def _eval_bn(bn: nn.BatchNorm2d) -> nn.Module:
    return bn.eval()  # frozen statistics inside a training model (detection-style fine-tuning)


def _timm_frozen(layer: GunnLayer) -> GunnLayer:
    layers = pytest.importorskip("timm.layers")
    return layers.freeze_batch_norm_2d(layer)


VARIANTS = {
    "torchvision_frozen": lambda layer: _replace_bns(layer, _torchvision_frozen),
    "eval_bn_in_train_model": lambda layer: _replace_bns(layer, _eval_bn),
    "subclass": lambda layer: _replace_bns(layer, _subclass),
    "untracked": lambda layer: _replace_bns(layer, _untracked),
    "some_eval": lambda layer: setattr(layer.units[1], "bn_mid", layer.units[1].bn_mid.eval()),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_batchnorm_variants_match_reference(impl: str, variant: str) -> None:
    layer = randomised_layer()
    VARIANTS[variant](layer)
    assert layer.training
    assert_matches_reference(layer, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_timm_freeze_batch_norm_matches_reference(impl: str) -> None:
    layer = _timm_frozen(randomised_layer())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    assert_matches_reference(layer, impl)


# --------------------------------------------------------------------------------------------
# SyncBatchNorm: two gloo processes on CPU, each with part of the batch


WORLD = 2
BATCH = 6
SHARES = (slice(0, 2), slice(2, 6))  # unequal halves: the global statistics weight by count
STEPS = 2


def _sync_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(1)
        xs = [torch.randn(BATCH, 12, 5, 4, dtype=torch.float64) for _ in range(STEPS)]
        gs = [torch.randn_like(x) for x in xs]
        half = SHARES[rank]
        results = {}
        for impl in IMPLS:
            oracle = randomised_layer()  # plain BatchNorm, whole batch, one process
            layer = nn.SyncBatchNorm.convert_sync_batchnorm(randomised_layer())
            layer.impl = impl
            assert isinstance(layer.units[0].bn_in, nn.SyncBatchNorm)
            try:
                for x, g in zip(xs, gs, strict=True):
                    y_ref, gx_ref = step(oracle, x, g)
                    y, gx = step(layer, x[half], g[half])
                    torch.testing.assert_close(y, y_ref[half], **TIGHT, msg="output")
                    torch.testing.assert_close(gx, gx_ref[half], **TIGHT, msg="input grad")
                for (name, p_ref), p in zip(
                    oracle.named_parameters(), layer.parameters(), strict=True
                ):
                    grad = p.grad.clone()
                    dist.all_reduce(grad)  # what DDP does with every parameter gradient
                    torch.testing.assert_close(grad, p_ref.grad, **TIGHT, msg=name)
                for (name, b_ref), b in zip(oracle.named_buffers(), layer.buffers(), strict=True):
                    torch.testing.assert_close(b, b_ref, rtol=1e-12, atol=1e-13, msg=name)
                results[impl] = "ok"
            except Exception as err:  # noqa: BLE001  (reported per implementation)
                results[impl] = f"{type(err).__name__}: {err}"
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sync_results() -> dict[int, dict[str, str]]:
    with tempfile.TemporaryDirectory() as tmp:
        context = mp.start_processes(
            _sync_worker,
            args=(str(Path(tmp) / "init"), tmp),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        for _ in range(240):  # at most 2 minutes; a hung collective fails instead of blocking
            if context.join(timeout=0.5):
                break
        else:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process SyncBatchNorm run did not finish in 2 minutes")
        return {r: torch.load(Path(tmp) / f"rank{r}.pt") for r in range(WORLD)}


@pytest.mark.parametrize("impl", IMPLS)
def test_sync_batchnorm_two_processes_match_whole_batch_reference(
    impl: str, sync_results: dict[int, dict[str, str]]
) -> None:
    for rank in range(WORLD):
        outcome = sync_results[rank][impl]
        if impl in KEEP:  # the whole-layer Function synchronises itself, on any device
            assert outcome == "ok", f"rank {rank}: {outcome}"
        else:  # these call the SyncBatchNorm modules, which torch runs on accelerators only
            assert "SyncBatchNorm expected input tensor to be on GPU" in outcome, outcome
