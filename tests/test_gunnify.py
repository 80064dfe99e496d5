"""gunnify (models/gunnify.py): GUNN's gradual update on torchvision, timm and our ResNets, checked
exactly against the original blocks and against the update rule written out independently."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from conftest import exit_status, train_here
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from gunn_exp.errors import ConfigError
from gunn_exp.models import create_model
from gunn_exp.models.gunnify import GradualBlock, Residual, gradual_blocks, gunnify


def small_bottleneck_resnet() -> nn.Module:
    """A torchvision ResNet of Bottlenecks, narrow enough for a CPU test (layer1: 64 channels)."""
    return ResNet(Bottleneck, [2, 2, 1, 1], num_classes=5, width_per_group=16)


MODELS = {
    "basic": lambda: create_model("resnet_mini"),  # resnet_cifar BasicBlocks
    "bottleneck": small_bottleneck_resnet,  # torchvision Bottlenecks
}


def sgd_trace(model: nn.Module, x: Tensor, steps: int = 3) -> dict[str, list[Tensor]]:
    """Train-mode outputs, parameter gradients and buffers after each of `steps` SGD steps,
    then the eval-mode output."""
    torch.manual_seed(0)
    labels = torch.randint(0, 5, (x.shape[0],))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trace: dict[str, list[Tensor]] = {"out": [], "grads": [], "buffers": []}
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        torch.nn.functional.cross_entropy(out, labels).backward()
        opt.step()
        trace["out"].append(out.detach())
        trace["grads"] += [p.grad.clone() for p in model.parameters()]
        trace["buffers"] += [b.clone() for b in model.buffers()]
    model.eval()
    with torch.no_grad():
        trace["out"].append(model(x))
    return trace


def assert_same_trace(a: dict[str, list[Tensor]], b: dict[str, list[Tensor]]) -> None:
    for key in a:
        assert len(a[key]) == len(b[key])
        for i, (u, v) in enumerate(zip(a[key], b[key], strict=True)):
            assert torch.equal(u, v), f"{key}[{i}] differs by {(u - v).abs().max()}"


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize(
    ("segments", "update", "mode"),
    [
        (1, "gradual", "exact"),
        (1, "gradual", "split"),
        (2, "simultaneous", "exact"),
        (4, "simultaneous", "exact"),
    ],
)
def test_conversions_that_must_equal_the_original(
    kind: str, segments: int, update: str, mode: str
) -> None:
    """K=1 (either mode) and the simultaneous update in exact mode are the original network:
    bitwise the same outputs, gradients and BatchNorm buffers over 3 SGD steps, and in eval."""
    torch.manual_seed(0)
    original = MODELS[kind]()
    converted = copy.deepcopy(original)
    report = gunnify(converted, segments, update=update, mode=mode)
    assert report.converted
    x = torch.randn(4, 3, 16, 16)
    assert_same_trace(sgd_trace(converted, x), sgd_trace(original, x))


def literal_gradual(block: nn.Module, x: Tensor, k: int) -> Tensor:
    """The gradual rule written out with the *unconverted* block: y_i is segment i of
    block(z_i), z_i = cat(y_1..y_{i-1}, x_i..x_K) (segment i of z_i is x_i, so this is
    act(x_i + F(z_i)_i))."""
    xs = list(x.split(x.shape[1] // k, dim=1))
    ys: list[Tensor] = []
    for i in range(k):
        z = torch.cat(ys + xs[i:], dim=1)
        ys.append(block(z)[:, i * xs[0].shape[1] : (i + 1) * xs[0].shape[1]])
    return torch.cat(ys, dim=1)


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
@pytest.mark.parametrize("k", [2, 4])
def test_exact_gradual_is_the_rule_on_the_original_block(block_cls: type, k: int) -> None:
    torch.manual_seed(0)
    channels = 64
    block = block_cls(channels, channels // block_cls.expansion)
    reference = copy.deepcopy(block)
    holder = nn.Sequential(block)
    gunnify(holder, k)
    converted = holder[0]
    assert isinstance(converted, GradualBlock)
    x = torch.randn(3, channels, 6, 6)
    converted.train(), reference.train()
    assert torch.equal(converted(x), literal_gradual(reference, x, k))
    # Eval mode with the same running statistics (the state-dict keys did not change).
    reference.load_state_dict(converted.state_dict())
    converted.eval(), reference.eval()
    assert torch.equal(converted(x), literal_gradual(reference, x, k))


def test_a_cut_batchnorm_counts_one_batch_per_forward_with_each_segments_statistics() -> None:
    """The BatchNorm that ends the branch is cut by segment: each channel is updated once per
    forward pass from its own segment's batch (checked with momentum=None, the cumulative
    average, where a count off by one changes the factor); the hidden one, shared by every
    G_i in exact mode, sees the K inputs z_i."""
    torch.manual_seed(0)
    k, channels = 4, 32
    block = BasicBlock(channels, channels)
    block.bn2.momentum = None
    reference = copy.deepcopy(block)
    holder = nn.Sequential(block).train()
    gunnify(holder, k)
    x = torch.randn(5, channels, 6, 6)
    holder(x)
    assert int(block.bn2.num_batches_tracked) == 1 and int(block.bn1.num_batches_tracked) == k
    xs, o = list(x.split(channels // k, dim=1)), channels // k
    ys, means, variances = [], [], []
    for i in range(k):
        z = torch.cat(ys + xs[i:], dim=1)
        pre = reference.conv2(reference.relu(reference.bn1(reference.conv1(z))))[
            :, i * o : (i + 1) * o
        ]
        means.append(pre.mean((0, 2, 3)))
        variances.append(pre.transpose(0, 1).flatten(1).var(dim=1))  # unbiased, as BatchNorm's
        ys.append(reference(z)[:, i * o : (i + 1) * o])
    torch.testing.assert_close(block.bn2.running_mean, torch.cat(means).detach())
    torch.testing.assert_close(block.bn2.running_var, torch.cat(variances).detach())


def test_split_mode_is_the_papers_construction() -> None:
    """mode=split against G_i built from fresh modules: G_i = BN(conv2[segment i, group i](
    ReLU(BN(conv1[group i](z_i))))) with each G_i owning hidden group i."""
    torch.manual_seed(0)
    k, channels = 4, 32
    block = BasicBlock(channels, channels)
    holder = nn.Sequential(block)
    gunnify(holder, k, mode="split")
    x = torch.randn(5, channels, 6, 6)
    o = channels // k
    units = []
    for i in range(k):
        rows = slice(i * o, (i + 1) * o)
        conv1 = nn.Conv2d(channels, o, 3, padding=1, bias=False)
        conv2 = nn.Conv2d(o, o, 3, padding=1, bias=False)
        bn1, bn2 = nn.BatchNorm2d(o), nn.BatchNorm2d(o)
        with torch.no_grad():
            conv1.weight.copy_(block.conv1.weight[rows])
            conv2.weight.copy_(block.conv2.weight[rows, rows])
            for fresh, bn in ((bn1, block.bn1), (bn2, block.bn2)):
                fresh.weight.copy_(bn.weight[rows])
                fresh.bias.copy_(bn.bias[rows])
        units.append(nn.Sequential(conv1, bn1, nn.ReLU(), conv2, bn2))
    xs = list(x.split(o, dim=1))
    ys: list[Tensor] = []
    for i, unit in enumerate(units):
        ys.append(torch.relu(xs[i] + unit(torch.cat(ys + xs[i:], dim=1))))
    torch.testing.assert_close(holder(x), torch.cat(ys, dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "split"])
def test_perturbing_g1_reaches_every_later_segment_only_when_gradual(mode: str) -> None:
    torch.manual_seed(0)
    k, channels = 4, 32
    x = torch.randn(2, channels, 5, 5)
    for update in ("gradual", "simultaneous"):
        holder = nn.Sequential(BasicBlock(channels, channels))
        gunnify(holder, k, update=update, mode=mode)
        block = holder.eval()[0]
        before = block(x).split(channels // k, dim=1)
        with torch.no_grad():  # parameters only G_1 uses: its rows of the last conv
            block.conv2.weight[: channels // k].add_(0.5)
        after = block(x).split(channels // k, dim=1)
        changed = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
        assert changed == ([True] * k if update == "gradual" else [True] + [False] * (k - 1))


@pytest.mark.parametrize(
    ("build", "converted", "skipped"),
    [
        (torchvision.models.resnet18, 5, 3),
        (torchvision.models.resnet50, 12, 4),
        (lambda: timm.create_model("resnet18"), 5, 3),
    ],
)
def test_torchvision_and_timm_resnets_keep_parameters_and_keys(
    build, converted: int, skipped: int
) -> None:
    torch.manual_seed(0)
    model = build()
    params, keys = list(model.parameters()), list(model.state_dict())
    weights = copy.deepcopy(model.state_dict())
    report = gunnify(model, 4)
    assert len(report.converted) == converted
    assert len(report.skipped) == skipped  # each stage's first block: stride 2 / downsample
    assert all("downsample" in why for why in report.skipped.values())
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert list(model.state_dict()) == keys
    model.load_state_dict(weights)  # torchvision/timm weights load as they are (strict)
    assert model(torch.randn(1, 3, 64, 64)).shape[1] == 1000


def test_generic_residual_wrapper() -> None:
    torch.manual_seed(0)
    branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh())
    block = Residual(branch, nn.ReLU())
    reference = copy.deepcopy(block)
    holder = nn.Sequential(block)
    assert gunnify(holder, 2).converted == ["0"]
    x = torch.randn(3, 8, 4, 4)
    assert torch.equal(holder(x), literal_gradual(reference, x, 2))
    with pytest.raises(ConfigError, match="generic Residual: mode=split"):
        gunnify(nn.Sequential(Residual(branch)), 2, mode="split")


def test_blocks_that_cannot_be_converted_are_listed_or_refused() -> None:
    model = create_model("resnet_mini")  # stages 16/32/64 channels; first blocks of 1, 2 shrink
    report = gunnify(model, 32)  # 16 channels are not divisible by 32
    assert report.converted == ["stages.1.1", "stages.2.1"]
    assert report.skipped["stages.0.0"] == "has 16 channels, not divisible by segments=32"
    assert "downsample" in report.skipped["stages.1.0"]
    with pytest.raises(ConfigError, match=r"^gunnify: block stages.1.0 cannot be converted: it "):
        gunnify(create_model("resnet_mini"), 4, blocks=["stages.1.0"])
    with pytest.raises(ConfigError, match=r"\['stages.9'\] are not residual blocks"):
        gunnify(create_model("resnet_mini"), 4, blocks=["stages.9"])
    with pytest.raises(ConfigError, match="no residual block of ResNetCifar could be converted"):
        gunnify(create_model("resnet_mini"), 3)
    with pytest.raises(ConfigError, match="no residual block of Gunn"):
        gunnify(create_model("gunn_mini"), 2)


def test_a_gunnified_model_trains_through_train_py(tmp_path) -> None:
    results = train_here(
        tmp_path,
        "experiment=digits",
        "model=resnet_mini",
        "model.gunnify.segments=4",
        "debug=tiny",
    )
    assert results["gunnify"] == {
        "segments": 4,
        "update": "gradual",
        "mode": "exact",
        "blocks": None,
    }
    assert results["params"] == 175_258  # same parameters as resnet_mini
    code, err = exit_status(
        lambda: train_here(tmp_path / "bad", "experiment=digits", "model=resnet_mini",
                           "model.gunnify.segments=3", "debug=tiny")
    )  # fmt: skip
    assert code == 2 and err == err.splitlines()[0] + "\n"  # one line
    assert err.startswith("error: gunnify: no residual block of ResNetCifar could be converted")


def test_split_mode_leaves_exactly_the_off_diagonal_blocks_unused() -> None:
    """`unused_parameters` (docs/MODELS.md's table) counts the converted blocks' entries that
    get no gradient."""
    torch.manual_seed(0)
    model = small_bottleneck_resnet()
    total = sum(p.numel() for p in model.parameters())
    gunnify(model, 4, mode="split")
    logits = model(torch.randn(4, 3, 32, 32))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 3, 0, 2])).backward()
    blocks = [b for _, b in gradual_blocks(model)]
    zero = sum(int((p.grad == 0).sum()) for b in blocks for p in b.parameters())
    unused = sum(b.unused_parameters() for b in blocks)
    assert unused > 0 and zero == unused and total == sum(p.numel() for p in model.parameters())
