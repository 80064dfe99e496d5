"""timm's model conventions, over every registered model (the registry drives the parameters).

Forward/backward, pretrained cfg, classifier API, feature taps (forward_intermediates,
features_only), FX, gradient checkpointing, torch.export, state-dict round trip across GUNN layer
implementations, and the timm-style builder options. Inputs are tiny (8x8 for CIFAR stems, 32x32
for ImageNet stems: the last stage is then 1x1); torch.export of the big models is @slow.
The timm integration itself is in test_timm_integration.py.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from conftest import MODEL_EXTRA, registered_model
from safetensors.torch import save_file
from torch import nn

from gunn_exp.data.transforms import IMAGENET_MEAN, IMAGENET_STD, cifar_stats
from gunn_exp.models import IMPLEMENTATIONS, GunnLayer, create_model, list_models
from gunn_exp.models.features import FeatureExtractor
from gunn_exp.models.gunn import symbolic_trace
from gunn_exp.models.layer import DEFAULT_IMPL
from gunn_exp.models.registry import pretrained_cfgs, resolve_pretrained_cfg

EXTRA = MODEL_EXTRA  # the generic builder's architecture
# torch.export traces every segment of every GUNN layer: minutes for these, seconds for the rest.
SLOW_EXPORT = {"gunn15", "sunn15", "gunn24", "sunn24", "gunn18", "sunn18", "wide_gunn18",
               "wide_sunn18"}  # fmt: skip
CHEAP = {"gunn_mini", "sunn_mini", "gunn", "resnet18_cifar"}
CFG_KEYS = ("input_size", "pool_size", "mean", "std", "interpolation", "crop_pct", "first_conv",
            "classifier", "num_classes")  # fmt: skip


def is_imagenet(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MaxPool2d) for m in model.stem.modules())


def tiny_batch(model: nn.Module, n: int = 2, imagenet_size: int = 32) -> torch.Tensor:
    """n images of 8x8 (CIFAR stem) or imagenet_size (ImageNet stem; 32: last stage 1x1)."""
    size = imagenet_size if is_imagenet(model) else 8
    return torch.randn(n, model.in_chans, size, size, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=list_models())
def registered(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    """Each registered model, built once per session (tests that change it work on a copy)."""
    return request.param, registered_model(request.param)


def test_default_cfg(registered: tuple[str, nn.Module]) -> None:
    name, model = registered
    cfg = model.pretrained_cfg
    assert all(key in cfg for key in CFG_KEYS)
    assert cfg["architecture"] == name
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert model.get_submodule(cfg["first_conv"]).in_channels == cfg["input_size"][0]
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.num_classes == cfg["num_classes"]
    if is_imagenet(model):
        assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
        assert (cfg["mean"], cfg["std"], cfg["crop_pct"]) == (IMAGENET_MEAN, IMAGENET_STD, 0.875)
    else:  # CIFAR-10 by default, as the data module normalises it
        assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
        assert (cfg["mean"], cfg["std"]) == cifar_stats("cifar10")
    if cfg["pool_size"] is not None:  # the final feature map at input_size
        stride = model.feature_info[-1]["reduction"]
        assert cfg["pool_size"] == tuple(s // stride for s in cfg["input_size"][1:])


@pytest.mark.parametrize("name", [n for n in list_models() if "cifar100" in pretrained_cfgs(n)])
def test_cifar100_tag(name: str) -> None:
    cfg = resolve_pretrained_cfg(f"{name}.cifar100")
    assert cfg["num_classes"] == 100 and (cfg["mean"], cfg["std"]) == cifar_stats("cifar100")
    assert resolve_pretrained_cfg(name, pretrained_cfg="cifar100") == cfg


def test_classifier_api(registered: tuple[str, nn.Module]) -> None:
    _, model = registered
    model = copy.deepcopy(model).train()
    x = tiny_batch(model)
    assert model.get_classifier() is model.fc
    # timm 1.0: head_hidden_size beside num_features (equal: no pre-logits layer), the width of
    # forward_head(pre_logits=True) and of the classifier's input.
    assert model.head_hidden_size == model.num_features == model.fc.in_features
    pre_logits = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre_logits.shape == (2, model.head_hidden_size)
    model.reset_classifier(5, global_pool="max")
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0, global_pool="")
    assert model(x).shape[:2] == (2, model.num_features) and model(x).ndim == 4
    with pytest.raises(ValueError, match="global_pool='' .* needs num_classes=0, got num_clas"):
        model.reset_classifier(3)
    with pytest.raises(ValueError, match="global_pool='catavgmax' is not supported"):
        model.reset_classifier(3, global_pool="catavgmax")
    model.reset_classifier(3, global_pool="avgmax")  # timm's mean of average and max pooling
    features = model.forward_features(x)
    expected = 0.5 * (features.mean((2, 3)) + features.amax((2, 3)))
    torch.testing.assert_close(model.forward_head(features, pre_logits=True), expected)


def test_feature_taps(registered: tuple[str, nn.Module]) -> None:
    """forward_intermediates gives one map per feature_info entry, of its channels and
    reduction; the final map is forward_features'; features_only gives the same maps."""
    _, model = registered
    model = copy.deepcopy(model).train()
    x = tiny_batch(model)
    torch.manual_seed(0)
    with torch.no_grad():
        final, taps = model.forward_intermediates(x)
        expected_final = model.forward_features(x)
    assert len(taps) == len(model.feature_info)
    for tap, info in zip(taps, model.feature_info, strict=True):
        assert tap.shape == (2, info["num_chs"], x.shape[2] // info["reduction"],
                             x.shape[3] // info["reduction"])  # fmt: skip
        assert isinstance(model.get_submodule(info["module"]), nn.Module)
    # Train-mode BatchNorm: the same batch gives the same maps whatever ran before.
    torch.testing.assert_close(final, expected_final, rtol=0, atol=0)
    only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert [t.shape for t in only] == [t.shape for t in taps[-2:]]
    extractor = FeatureExtractor(copy.deepcopy(model), out_indices=(0, -1))
    assert extractor.feature_info.channels() == [model.feature_info[i]["num_chs"] for i in (0, -1)]
    with torch.no_grad():
        features = extractor(x)
    torch.testing.assert_close(features, [taps[0], taps[-1]], rtol=0, atol=0)


def test_fx_symbolic_trace(registered: tuple[str, nn.Module]) -> None:
    _, model = registered
    model = copy.deepcopy(model).train()
    graph_module = symbolic_trace(model)
    leaves = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    layers = [n for n, m in model.named_modules() if isinstance(m, GunnLayer)]
    assert [t for t in leaves if t in layers] == layers  # each GUNN layer is one call
    x = tiny_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_plain_fx_symbolic_trace_records_the_sequential_rule(impl: str) -> None:
    model = create_model("gunn_mini", impl=impl).train()
    graph_module = torch.fx.symbolic_trace(model)
    assert not any(isinstance(m, GunnLayer) for m in graph_module.modules())  # traced through
    x = torch.randn(4, model.in_chans, 16, 16)
    torch.testing.assert_close(graph_module(x), model(x), rtol=0, atol=0)


def test_fresh_model_forward_backward_finite_and_grad_checkpointing(
    registered: tuple[str, nn.Module],
) -> None:
    """A fresh model's train-mode forward and backward are finite; with gradient checkpointing the
    backward gives the same gradients."""
    _, model = registered
    model = copy.deepcopy(model).train()
    x = tiny_batch(model)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_grad_checkpointing_every_impl(impl: str) -> None:
    torch.manual_seed(0)
    model = create_model("gunn_mini", impl=impl).train()
    reference = create_model("gunn_mini", impl="reference").train()
    reference.load_state_dict(model.state_dict())
    model.set_grad_checkpointing()
    x = torch.randn(2, 3, 8, 8)
    model(x).sum().backward()
    reference(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORT else n for n in list_models()],
)
def test_torch_export(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, **EXTRA.get(name, {})).train()
    x = tiny_batch(model, 3)
    with torch.no_grad():
        model(x)  # running statistics from a batch: eval then gives moderate logits
        model.eval()
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EXPORT else n for n in list_models()],
)
def test_torchscript(name: str) -> None:
    """timm's test_model_forward_torchscript: torch.jit.script compiles every model (GUNN layers
    as the sequential rule, since autograd Functions do not script) and gives eager's logits, up
    to the rounding of another summation order."""
    model = copy.deepcopy(registered_model(name)).train()
    x = tiny_batch(model, 3)
    with torch.no_grad():
        model(x)  # running statistics from a batch: eval then gives moderate logits
        model.eval()
        with warnings.catch_warnings():  # PyTorch deprecates TorchScript; scripting is the test
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.script(model)
        expected = model(x)
        scale = expected.abs().max().item()
        torch.testing.assert_close(scripted(x), expected, rtol=0, atol=1e-5 * scale)


def test_torchscript_trains_as_eager() -> None:
    """A scripted GUNN in train mode: the same loss, gradients and BatchNorm running statistics
    as the eager model's fast implementation."""
    torch.manual_seed(0)
    eager = create_model("gunn_mini", num_classes=4, scriptable=True).train()  # timm's flag
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(copy.deepcopy(eager))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    losses = [nn.functional.cross_entropy(m(x), y) for m in (eager, scripted)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for (name, a), b in zip(eager.named_parameters(), scripted.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(eager.buffers(), scripted.buffers(), strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
def test_torch_export_every_impl(impl: str) -> None:
    torch.manual_seed(0)
    model = create_model("gunn_mini", impl=impl).train()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        model(x)
        model.eval()
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_across_impls(
    registered: tuple[str, nn.Module], tmp_path: Path
) -> None:
    """Weights saved as plain safetensors from a model load, through pretrained=True, into the
    same architecture built with another implementation, tensor for tensor."""
    name, model = registered
    file = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(file))
    is_gunn = any(isinstance(m, GunnLayer) for m in model.modules())
    loaded = create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(file)},
        **EXTRA.get(name, {}),
        **({"impl": "reference"} if is_gunn else {}),
    )
    assert_same_tensors(loaded.state_dict(), model.state_dict())


@pytest.mark.parametrize(
    "name",
    [
        n if n in CHEAP else pytest.param(n, marks=pytest.mark.slow)
        for n in list_models()
        if n != "resnet18_cifar"
    ],
)
def test_same_function_across_impls(name: str) -> None:
    """Trained-like weights (running statistics from a batch) give the same outputs under every
    implementation, in train and eval mode. The big models: the default against `reference`."""
    torch.manual_seed(0)
    model = create_model(name, **EXTRA.get(name, {})).train()
    # ImageNet stem at 64x64: a 1x1 last stage would leave train-mode BatchNorm two values per
    # channel, whose normalisation turns rounding differences into O(1) ones.
    x = tiny_batch(model, imagenet_size=64)
    with torch.no_grad():
        model(x)
    saved = copy.deepcopy(model.state_dict())
    impls = sorted(IMPLEMENTATIONS) if name in CHEAP else [DEFAULT_IMPL]
    for mode in (True, False):  # a train-mode forward moves the running statistics: reload
        outputs = {}
        for impl in ["reference", *impls]:
            set_impl(model, impl)
            model.load_state_dict(saved)
            with torch.no_grad():
                outputs[impl] = model.train(mode)(x)
        # A fresh GUNN's eval logits can be huge (README), hence a relative tolerance.
        scale = outputs["reference"].abs().max().item()
        for impl in impls:
            torch.testing.assert_close(
                outputs[impl], outputs["reference"], rtol=1e-4, atol=1e-5 * scale, msg=impl
            )


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def set_impl(model: nn.Module, impl: str) -> None:
    for layer in model.modules():
        if isinstance(layer, GunnLayer):
            layer.impl = impl


def test_builder_options_timm_style(tmp_path: Path) -> None:
    model = create_model("gunn_mini", num_classes=7, in_chans=1, drop_rate=0.5, global_pool="max")
    assert (model.num_classes, model.stem[0].in_channels, model.drop.p) == (7, 1, 0.5)
    assert model.global_pool.pool_type == "max"
    assert create_model("gunn_mini", drop_path_rate=0.0, drop_block_rate=None).num_classes == 10
    with pytest.raises(ValueError, match=r"gunn_mini: cannot honour drop_path_rate=0.1 \("):
        create_model("gunn_mini", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="unknown pretrained tag 'in1k'.*cifar10"):
        create_model("gunn_mini.in1k")
    with pytest.raises(ValueError, match="no weights are published.*pretrained_cfg_overlay"):
        create_model("gunn_mini", pretrained=True)
    with pytest.raises(ValueError, match="unknown model 'gunn99'"):
        create_model("gunn99.cifar10")
    # Tagged names and the generic builder's ImageNet cfg.
    assert create_model("gunn_mini.cifar100").num_classes == 100
    generic = create_model("gunn.in1k", stem="imagenet", widths=(8,), segments=(2,))
    assert generic.pretrained_cfg["input_size"] == (3, 224, 224) and generic.num_classes == 1000


def test_pretrained_weights_with_a_new_head_or_channels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = create_model("gunn_mini")
    file = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(file))
    overlay = {"file": str(file)}
    tuned = create_model(
        "gunn_mini", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3
    )
    assert tuned.fc.out_features == 3 and not tuned.fc.bias.any()  # fresh classifier
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    tuned_state = tuned.state_dict()
    assert_same_tensors({k: tuned_state[k] for k in backbone}, backbone)
    with pytest.raises(ValueError, match="stem.0.weight has 3 input channels, the model 1"):
        create_model("gunn_mini", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
    with pytest.raises(ValueError, match="do not fit the model: .* of another shape"):
        create_model("sunn15", pretrained=True, pretrained_cfg_overlay=overlay)


def test_features_only_builder() -> None:
    extractor = create_model("gunn_mini", features_only=True, out_indices=(1, 3))
    assert extractor.feature_info.reduction() == [1, 4]
    assert not hasattr(extractor.model, "fc") or isinstance(extractor.model.fc, nn.Identity)
    assert [f.shape for f in extractor(torch.randn(1, 3, 16, 16))] == [
        (1, 32, 16, 16),
        (1, 64, 4, 4),
    ]
    with pytest.raises(ValueError, match=r"indices=\[5\]: feature taps are numbered 0..3"):
        create_model("gunn_mini", features_only=True, out_indices=(5,))


def test_imagenet_taps_precede_the_closing_pool() -> None:
    """The ImageNet layout pools at the end of stages 1-3: taps sit before those pools, at
    strides 2 (stem, before its max pool), 4, 8, 16, 32 like a ResNet's."""
    model = create_model("gunn", stem="imagenet", pool="after", widths=(8, 12, 16, 20),
                         segments=(2, 2, 2, 2), projection=False)  # fmt: skip
    assert [i["reduction"] for i in model.feature_info] == [2, 4, 8, 16, 32]
    assert [i["module"] for i in model.feature_info] == [
        "stem.2", "stages.0.gunn1", "stages.1.gunn1", "stages.2.gunn1", "stages.3",
    ]  # fmt: skip


def test_checkpoint_path_loads_plain_weights_strictly(tmp_path: Path) -> None:
    """timm's `checkpoint_path`: every tensor, classifier included; another class count, or a
    training checkpoint (a pickle), is refused by name."""
    source = create_model("gunn_mini", num_classes=7)
    file = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(file))
    loaded = create_model("gunn_mini", num_classes=7, checkpoint_path=file)
    assert_same_tensors(loaded.state_dict(), source.state_dict())
    unfit = r"checkpoint_path=.*model\.safetensors: the weights do not fit the model: 2 of another"
    with pytest.raises(ValueError, match=unfit):
        create_model("gunn_mini", num_classes=10, checkpoint_path=file)
    ckpt = tmp_path / "best.ckpt"
    ckpt.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"best\.ckpt is a training checkpoint; export"):
        create_model("gunn_mini", checkpoint_path=ckpt)
