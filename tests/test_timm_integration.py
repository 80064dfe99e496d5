"""timm itself on gunn-exp's models (`import gunn_exp.timm`); skipped when timm is not installed.

Builds go through timm.create_model, data configs through timm.data, training pieces through
timm.optim / timm.utils, weights through timm's load_checkpoint and its Hugging Face folder layout.
Everything offline: weights are generated here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

timm = pytest.importorskip("timm")
gunn_timm = pytest.importorskip("gunn_exp.timm")

from timm.data import resolve_data_config  # noqa: E402
from timm.models import get_pretrained_cfg, load_checkpoint  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.utils import ModelEmaV3  # noqa: E402

from gunn_exp.models import Gunn, GunnLayer, create_model, list_models  # noqa: E402
from gunn_exp.models.registry import pretrained_cfgs  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the Hugging Face Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", list_models())
def test_every_model_is_in_timms_registry_with_its_cfgs(name: str) -> None:
    assert timm.is_model(name)
    for tag, cfg in pretrained_cfgs(name).items():
        theirs = get_pretrained_cfg(f"{name}.{tag}").to_dict()
        for key in ("input_size", "pool_size", "mean", "std", "crop_pct", "interpolation",
                    "first_conv", "classifier", "num_classes"):  # fmt: skip
            assert theirs[key] == cfg[key], (tag, key)
    # The first tag is timm's default too (no tag given).
    assert get_pretrained_cfg(name).tag == next(iter(pretrained_cfgs(name)))


def test_timm_create_model_builds_ours() -> None:
    model = timm.create_model("gunn15", pretrained=False, num_classes=100)
    assert isinstance(model, Gunn) and model.num_classes == 100
    assert sum(p.numel() for p in model.parameters()) == 1_618_236  # docs/SPEC.md §2, CIFAR-100
    assert timm.create_model("sunn_mini").gunn_layers().__next__().update == "simultaneous"
    with pytest.raises(ValueError, match=r"gunn_mini: cannot honour drop_path_rate=0.2 \("):
        timm.create_model("gunn_mini", drop_path_rate=0.2)
    assert gunn_timm.register_with_timm() == []  # importing again changes nothing


@pytest.mark.parametrize("name", list_models())
def test_untrained_model_from_timm_is_finite_in_eval_mode(name: str) -> None:
    """timm's test_model_forward: create_model, eval(), a random input, no NaN. Built through
    timm a model starts as timm's ResNets do (zero_init_last); gunn_exp's own builder, which
    the paper recipes use, keeps the authors' init (every BatchNorm gamma 1)."""
    extra = {"widths": (8, 12), "segments": (2, 3)} if name == "gunn" else {}
    torch.manual_seed(0)
    model = timm.create_model(name, **extra).eval()
    size = 32 if model.pretrained_cfg["input_size"][-1] == 32 else 64
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, model.num_classes) and torch.isfinite(out).all()
    last_gammas = [m.bn_out.weight for m in model.modules() if hasattr(m, "bn_out")]
    last_gammas += [m.bn2.weight for m in model.modules() if hasattr(m, "bn2")]
    assert last_gammas and all((g == 0).all() for g in last_gammas)
    authors = next(m for m in create_model("gunn_mini").modules() if hasattr(m, "bn_out"))
    assert (authors.bn_out.weight == 1).all()


def test_resolve_data_config_cifar_vs_imagenet() -> None:
    cifar = resolve_data_config({}, model=timm.create_model("gunn_mini"))
    assert cifar["input_size"] == (3, 32, 32) and cifar["crop_pct"] == 1.0
    assert cifar["mean"] == pytest.approx((0.4914, 0.4824, 0.4467), abs=1e-4)
    cifar100 = resolve_data_config({}, model=timm.create_model("gunn_mini.cifar100"))
    assert cifar100["mean"] == pytest.approx((0.5071, 0.4867, 0.4408), abs=1e-4)
    imagenet = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg("gunn18").to_dict())
    assert imagenet["input_size"] == (3, 224, 224)
    assert (imagenet["interpolation"], imagenet["crop_pct"]) == ("bicubic", 0.875)
    assert imagenet["mean"] == (0.485, 0.456, 0.406)


@pytest.mark.parametrize(("name", "size"), [("gunn_mini", 16), ("gunn18", 64)])
def test_timm_features_only_matches_forward_intermediates(name: str, size: int) -> None:
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True).train()
    model = timm.create_model(name).train()
    model.load_state_dict(features.model.state_dict(), strict=False)  # the pruned head aside
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        got = features(x)
        expected = model.forward_intermediates(x, intermediates_only=True)
    assert features.feature_info.channels() == [i["num_chs"] for i in model.feature_info]
    assert [f.shape[-1] for f in got] == [size // r for r in features.feature_info.reduction()]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_timm_fx_feature_extraction_treats_gunn_layers_as_leaves() -> None:
    torch.manual_seed(0)
    fx = timm.create_model("gunn_mini", features_only=True, feature_cls="fx").train()
    graph = fx.graph_module
    layers = [name for name, m in graph.named_modules() if isinstance(m, GunnLayer)]
    calls = [node.target for node in graph.graph.nodes if node.op == "call_module"]
    assert len(layers) == 3 and [c for c in calls if c in layers] == layers  # one call each
    assert not [c for c in calls if c.startswith(tuple(f"{layer}." for layer in layers))]
    # The taps are the model's own.
    model = timm.create_model("gunn_mini").train()
    model.load_state_dict(graph.state_dict(), strict=False)  # the pruned head aside
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        torch.testing.assert_close(fx(x), expected, rtol=0, atol=0)


def test_timm_pretrained_loading_and_load_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("gunn_mini")
    file = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(file))
    overlay = {"file": str(file)}
    same = timm.create_model("gunn_mini", pretrained=True, pretrained_cfg_overlay=overlay)
    grey = timm.create_model(
        "gunn_mini", pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=4
    )
    torch.testing.assert_close(same.state_dict(), source.state_dict(), rtol=0, atol=0)
    assert grey.stem[0].weight.shape[1] == 1 and grey.fc.out_features == 4  # timm adapted them
    # timm's load_checkpoint: the safetensors file, and a torch file of the state dict.
    torch.save(source.state_dict(), tmp_path / "model.pth")
    for path in (file, tmp_path / "model.pth"):
        target = timm.create_model("gunn_mini")
        load_checkpoint(target, str(path))
        torch.testing.assert_close(target.state_dict(), source.state_dict(), rtol=0, atol=0)


def test_timm_optimizer_and_ema_train_a_step() -> None:
    torch.manual_seed(0)
    model = timm.create_model("gunn_mini", num_classes=3).train()
    opt = create_optimizer_v2(model, "sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    layer_decay = create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)
    assert len(layer_decay.param_groups) > 2  # group_matcher: stem and stages get their lrs
    ema = ModelEmaV3(model, decay=0.5)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    before = model.fc.weight.detach().clone()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    ema.update(model)  # no step: the plain decay
    assert not torch.equal(model.fc.weight, before)
    torch.testing.assert_close(ema.module.fc.weight, (before + model.fc.weight) / 2)
    assert torch.isfinite(ema.module.eval()(x)).all()


def test_save_pretrained_from_pretrained_round_trip(tmp_path: Path) -> None:
    """The Hugging Face folder layout via timm's save_for_hf, loaded back by timm (local-dir)
    and by gunn-exp's create_model; architecture options survive (here: update, num_classes)."""
    torch.manual_seed(0)
    model = create_model("gunn_mini", num_classes=7, update="simultaneous").train()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)
    model.eval()
    folder = gunn_timm.save_pretrained(model, tmp_path / "hf")
    assert {p.name for p in folder.iterdir()} == {"model.safetensors", "config.json"}
    loaded = gunn_timm.from_pretrained(folder).eval()
    ours = create_model(
        "gunn_mini",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(folder)},
        num_classes=7,
        update="simultaneous",
    ).eval()
    with torch.no_grad():
        expected = model(x)
        for other in (loaded, ours):
            assert next(other.gunn_layers()).update == "simultaneous" and other.num_classes == 7
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)


def test_timm_script_runner_registers_the_models(tmp_path: Path) -> None:
    """`python -m gunn_exp.timm SCRIPT`: a timm-style script sees the models by name."""
    script = tmp_path / "bench.py"
    out = tmp_path / "out.txt"
    script.write_text(
        "import sys, torch, timm\n"
        "from timm.data import resolve_data_config\n"
        "m = timm.create_model(sys.argv[1]).train()\n"
        "cfg = resolve_data_config({}, model=m)\n"
        "x = torch.randn(2, *cfg['input_size']).contiguous(memory_format=torch.channels_last)\n"
        "m.to(memory_format=torch.channels_last)(x).sum().backward()\n"
        f"open({str(out)!r}, 'w').write(str(cfg['input_size']))\n"
    )
    argv = sys.argv
    try:
        assert gunn_timm.main([str(script), "gunn_mini"]) == 0
    finally:
        sys.argv = argv
    assert out.read_text() == "(3, 32, 32)"


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("TIMM_BENCHMARK"),
    reason="a manual check: timm's wheel does not ship its scripts; set TIMM_BENCHMARK="
    "<pytorch-image-models checkout>/benchmark.py (README)",
)
def test_timms_benchmark_script(tmp_path: Path) -> None:
    """timm's own benchmark.py measures a model: its result JSON has the throughputs and no
    `error` (benchmark.py's `_try_run` reports a failed model as {"model": ..., "error": ...}
    and still exits 0)."""
    out = tmp_path / "result.json"
    argv = sys.argv
    try:
        gunn_timm.main([os.environ["TIMM_BENCHMARK"], "--model", "gunn_mini", "--device", "cpu",
                        "--bench", "both", "-b", "2", "--num-warm-iter", "1",
                        "--num-bench-iter", "5", "--results-file", str(out),
                        "--results-format", "json"])  # fmt: skip
    finally:
        sys.argv = argv
    result = json.loads(out.read_text())
    # A list: the name matched no registered model, and benchmark.py ran a (here empty) sweep.
    assert isinstance(result, dict) and result["model"] == "gunn_mini", result
    assert "error" not in result, result["error"]
    assert result["infer_samples_per_sec"] > 0 and result["train_samples_per_sec"] > 0, result
