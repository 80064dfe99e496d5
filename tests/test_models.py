"""The model zoo: generated from the registry, so a model is tested the day it is registered.

Big models run at small inputs (8x8 for CIFAR stems, 64x64 for ImageNet stems: the last stage is
then 2x2, large enough for every 3x3 tap to receive a gradient).
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from conftest import MODEL_EXTRA, compose_train, registered_model
from hydra.utils import instantiate
from torch import nn

from gunn_exp.models import Gunn, GunnUnit, create_model, list_models
from gunn_exp.models.resnet_cifar import ResNetCifar

EXTRA = MODEL_EXTRA  # the generic builder's architecture

PARAMS = [  # docs/SPEC.md §2, to the unit
    ("gunn15", 10, 1_585_746),
    ("gunn15", 100, 1_618_236),
    ("gunn24", 10, 29_649_276),
    ("gunn24", 100, 29_754_666),
    ("gunn18", 1000, 28_909_736),
    ("wide_gunn18", 1000, 45_606_696),
    ("sunn15", 10, 1_585_746),
    ("sunn24", 100, 29_754_666),
    ("sunn18", 1000, 28_909_736),
    ("wide_sunn18", 1000, 45_606_696),
    ("gunn_mini", 10, 119_050),
    ("sunn_mini", 10, 119_050),
    ("resnet18_cifar", 10, 11_173_962),
    ("resnet_mini", 10, 175_258),
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def small_batch(model: nn.Module, for_gradients: bool = False) -> torch.Tensor:
    """Two random images, as small as the model allows: 8x8 for a CIFAR stem; for an ImageNet
    stem 32x32, or 64x64 when every 3x3 tap must receive a gradient (last stage 2x2)."""
    imagenet_stem = any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())
    size = (64 if for_gradients else 32) if imagenet_stem else 8
    return torch.randn(2, 3, size, size)


@pytest.fixture(scope="module", params=list_models())
def registered(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each registered model, built once per session (tests that change it work on a copy)."""
    return request.param, registered_model(request.param)


@pytest.mark.parametrize(("name", "num_classes", "expected"), PARAMS)
def test_parameter_count(name: str, num_classes: int, expected: int) -> None:
    assert n_params(create_model(name, num_classes=num_classes)) == expected


def test_every_paper_model_and_twin_is_registered() -> None:
    paper = {"gunn15", "gunn24", "gunn18", "wide_gunn18"}
    twins = {name.replace("gunn", "sunn") for name in paper | {"gunn_mini"}}
    assert paper | twins | {"gunn", "gunn_mini", "resnet18_cifar"} <= set(list_models())


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"filter": "*sunn1*"}, ["sunn15", "sunn18", "wide_sunn18"]),
        ({"filter": ["resnet*", "gunn_*"]}, ["gunn_mini", "resnet18_cifar", "resnet_mini"]),
        ({"filter": "gunn*", "exclude_filters": ["*mini", "gunn"]}, ["gunn15", "gunn18", "gunn24"]),
        ({"module": "resnet_cifar"}, ["resnet18_cifar", "resnet_mini"]),
        ({"filter": "gunn1*", "include_tags": True},
         ["gunn15.cifar10", "gunn15.cifar100", "gunn18.in1k"]),
        ({"pretrained": True}, []),  # no weights are published for these models
    ],
)  # fmt: skip
def test_list_models_filters_as_timm(kwargs: dict, expected: list[str]) -> None:
    assert list_models(**kwargs) == expected


def test_list_models_pretrained_lists_a_model_with_a_weight_source(monkeypatch) -> None:
    from gunn_exp.models import registry

    with_file = {tag: dict(cfg) for tag, cfg in registry._CFGS["gunn_mini"].items()}
    with_file["cifar10"]["file"] = "weights/gunn_mini.safetensors"
    monkeypatch.setitem(registry._CFGS, "gunn_mini", with_file)
    assert list_models(pretrained=True) == ["gunn_mini.cifar10"]


def test_generic_gunn_without_an_architecture_says_what_it_needs() -> None:
    with pytest.raises(TypeError, match=r"needs widths and segments.*create_model\('gunn15'\)"):
        create_model("gunn")


def test_forward_shape_and_backward_reaches_every_parameter(
    registered: tuple[str, nn.Module],
) -> None:
    _, model = registered
    model = copy.deepcopy(model).train()
    x = small_batch(model, for_gradients=True)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"no gradient reaches {missing[:5]} ({len(missing)} in all)"


def test_eval_is_deterministic_and_api_composes(registered: tuple[str, nn.Module]) -> None:
    _, model = registered
    model = copy.deepcopy(model)
    x = small_batch(model)
    model.train()(x)  # moves BN statistics: eval must then use them, identically every time
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        feature_map = model.forward_features(x)
        composed = model.forward_head(feature_map)
        pooled = model.forward_head(feature_map, pre_logits=True)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, composed, rtol=0, atol=0)
    assert feature_map.shape[1] == model.num_features
    assert pooled.shape == (2, model.num_features)


def test_reset_classifier(registered: tuple[str, nn.Module]) -> None:
    _, model = registered
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        feature_map = model.forward_features(small_batch(model))
        model.reset_classifier(5)
        assert model.num_classes == 5
        assert model.forward_head(feature_map).shape == (2, 5)
        assert not model.fc.bias.any()
        model.reset_classifier(0)
        assert model.forward_head(feature_map).shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["gunn15", "resnet18_cifar"])
def test_init_follows_spec(name: str) -> None:
    """docs/SPEC.md §2: conv kaiming normal (fan_out, relu), BN weight 1 / bias 0, Linear bias 0."""
    torch.manual_seed(0)
    model = create_model(name)
    standardised = []
    # GunnUnit's fused first conv is two convs (bottleneck, projection), each with its own fan_out.
    blocks = {
        m.conv_in: [m.hidden] + ([m.width] if m.projection else [])
        for m in model.modules()
        if isinstance(m, GunnUnit)
    }
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            for w in m.weight.detach().split(blocks.get(m, [m.out_channels])):
                fan_out = w.shape[0] * m.kernel_size[0] * m.kernel_size[1]
                standardised.append(w.flatten() / math.sqrt(2.0 / fan_out))
        elif isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert not m.bias.any()
        elif isinstance(m, nn.Linear):
            assert not m.bias.any()
            # PyTorch's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zeros
            bound = 1 / math.sqrt(m.in_features)
            assert 0 < m.weight.abs().max() <= bound
    pooled = torch.cat(standardised)
    assert abs(pooled.mean().item()) < 0.01
    assert abs(pooled.std().item() - 1) < 0.01


@pytest.mark.parametrize(("gunn", "sunn"), [("gunn_mini", "sunn_mini"), ("gunn15", "sunn15")])
def test_sunn_twin_same_parameters_different_function(gunn: str, sunn: str) -> None:
    g, s = create_model(gunn), create_model(sunn)
    assert {layer.update for layer in s.gunn_layers()} == {"simultaneous"}
    s.load_state_dict(g.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(g.eval()(x), s.eval()(x))


def test_options_reach_the_layers() -> None:
    model = create_model("gunn_mini", update="simultaneous", in_chans=1, drop_rate=0.3)
    assert {layer.update for layer in model.gunn_layers()} == {"simultaneous"}
    assert model.stem[0].in_channels == 1
    assert model.drop.p == 0.3
    impl = next(model.gunn_layers()).impl
    assert {layer.impl for layer in create_model("gunn_mini", impl=impl).gunn_layers()} == {impl}


def test_layout_of_paper_models() -> None:
    """docs/SPEC.md §2's tables: where the pooling sits, the head, the total stride."""
    gunn15 = create_model("gunn15").eval()
    with torch.no_grad():
        assert gunn15.stages[0](torch.zeros(1, 64, 32, 32)).shape == (1, 240, 32, 32)
        assert gunn15.forward_features(torch.zeros(1, 3, 32, 32)).shape == (1, 360, 8, 8)
    assert isinstance(gunn15.stages[1].pool, nn.AvgPool2d)  # CIFAR: pool before the GUNN layer
    assert [len(list(s.children())) for s in create_model("gunn24").stages] == [3, 4, 4]

    gunn18 = create_model("gunn18").eval()
    assert gunn18.num_classes == 1000
    conv, pool = gunn18.stem[0], gunn18.stem[-1]
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert all(isinstance(stage[-1], nn.AvgPool2d) for stage in gunn18.stages[:-1])  # after
    assert not isinstance(gunn18.stages[-1][-1], nn.AvgPool2d)  # the global pool does the last
    assert isinstance(gunn18.head, nn.Identity)
    with torch.no_grad():  # total stride 32: 2000x7x7 at 224x224
        assert gunn18.forward_features(torch.zeros(1, 3, 64, 64)).shape == (1, 2000, 2, 2)


def test_create_model_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="unknown model 'gunn99'.*gunn15"):
        create_model("gunn99")
    with pytest.raises(TypeError, match="'widht'"):
        create_model("gunn15", widht=3)
    # A named model's architecture is its name: refused, naming the generic builder.
    with pytest.raises(TypeError, match=r"gunn15 fixes widths: .*create_model\('gunn', widths"):
        create_model("gunn15", widths=(8, 8, 8))
    with pytest.raises(TypeError, match="gunn_mini fixes segments"):
        create_model("sunn_mini", segments=(1, 1, 1))
    with pytest.raises(TypeError, match=r"resnet_mini fixes blocks, widths: .*ResNetCifar\("):
        create_model("resnet_mini", blocks=(1, 1, 1), widths=(8, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"widths": (8, 12), "segments": (2, 5)}, "stage 2: width 12 is not divisible by segm"),
        ({"widths": (8, 12), "segments": (2,)}, "one entry per stage"),
        ({"widths": (8,), "segments": (2,), "layers_per_stage": 0}, "must be >= 1, got 0"),
        ({"widths": (8,), "segments": (2,), "stem": "tiny"}, "stem='tiny'"),
        ({"widths": (8,), "segments": (2,), "pool": "middle"}, "pool='middle'"),
        ({"widths": (8,), "segments": (2,), "in_chans": 0}, "in_chans=0 must be a positive"),
        ({"widths": (8,), "segments": (2,), "head_width": -1}, "head_width=-1 must be a posit"),
        ({"widths": (8,), "segments": (2,), "num_classes": -1}, r"num_classes=-1 must be >= 0"),
    ],
)
def test_bad_architecture_raises(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Gunn(**kwargs)


CHEAP = {"gunn15", "sunn15", "gunn_mini", "sunn_mini", "custom_gunn", "resnet_mini"}


@pytest.mark.parametrize("name", [n for n in list_models() if n != "gunn"] + ["custom_gunn"])
def test_hydra_config_builds_the_model(name: str) -> None:
    """conf/model/<name>.yaml exists for every registered model, names it and passes valid
    options; the cheap ones are built (the big ones' builders are covered above)."""
    # Composed by Hydra: the model files share conf/model/base/registry.yaml through `defaults`.
    cfg = compose_train(f"model={name}", "data=cifar100")  # 100 classes, 3 channels
    assert cfg.model.name == ("gunn" if name == "custom_gunn" else name)
    assert cfg.model.get("update", "simultaneous" if "sunn" in name else "gradual") == (
        "simultaneous" if "sunn" in name else "gradual"
    )
    model_cls = ResNetCifar if name.startswith("resnet") else Gunn
    options = set(cfg.model) - {"_target_", "name"}
    # create_model's own options (e.g. gunnify) or the model constructor's
    factory = set(inspect.signature(create_model).parameters) - {"name", "kwargs"}
    assert options <= set(inspect.signature(model_cls).parameters) | factory
    if name in CHEAP:
        model = instantiate(cfg.model)
        assert model.num_classes == 100
        if name in ("gunn15", "custom_gunn"):  # custom_gunn.yaml spells out GUNN-15
            assert n_params(model) == 1_618_236
