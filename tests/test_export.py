"""export.py: the TorchScript and ONNX files give the trained model's outputs on CPU; the plain
weights (safetensors + config.json) load in gunn-exp and timm. Both exports are of the session's
tiny digits run; the TorchScript/ONNX one runs export.py in this process (conftest.run_tool), the
safetensors one as a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from conftest import run_entry, run_tool
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

from gunn_exp.inference.export import export_run
from gunn_exp.inference.run import load_run
from gunn_exp.models import create_model
from gunn_exp.rundir.preprocessing import Preprocessing
from gunn_exp.rundir.weights import init_from_checkpoint

ATOL = 1e-4
# torch.jit.load warns that TorchScript is deprecated; loading it is what this test is about.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit")


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, export folder) of the session's tiny digits run."""
    run_dir = digits_run[1]
    out = tmp_path_factory.mktemp("export")
    code, stdout, _ = run_tool("export.py", str(run_dir), "--out", str(out))
    assert code == 0 and "model.onnx: max |logit difference|" in stdout
    return run_dir, out


def digit_batch(preprocessing: Preprocessing, n: int, tmp_path: Path) -> torch.Tensor:
    """`n` real digits as image files, preprocessed as recorded (n: a batch size not traced)."""
    images = load_digits().images[:n]
    paths = []
    for i, pixels in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((pixels * 255 / 16).round().astype(np.uint8), mode="L").save(paths[-1])
    return torch.stack([preprocessing.load(p) for p in paths])


def test_export_writes_models_with_their_preprocessing(exported: tuple[Path, Path]) -> None:
    run_dir, out = exported
    assert {p.name for p in out.iterdir()} == {
        "model.ts",
        "model.onnx",
        "preprocessing.json",
        "classes.json",
    }
    assert Preprocessing.read(out) == Preprocessing.read(run_dir)
    assert json.loads((out / "classes.json").read_text()) == [str(d) for d in range(10)]


def test_exported_models_match_the_eager_model_on_cpu(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, out = exported
    run = load_run(run_dir)  # the model as trained (its configured GUNN implementation)
    x = digit_batch(Preprocessing.read(out), 5, tmp_path)
    with torch.no_grad():
        expected = run.model(x)
        scripted = torch.jit.load(str(out / "model.ts"))(x)
    torch.testing.assert_close(scripted, expected, atol=ATOL, rtol=0)
    session = onnxruntime.InferenceSession(
        str(out / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    assert session.get_inputs()[0].shape[0] == "batch"  # dynamic batch dimension
    (logits,) = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=ATOL, rtol=0)


def test_a_model_with_a_memory_light_gunn_implementation_exports(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    # Whole-layer autograd Functions cannot be traced; export switches to `reference`, which
    # computes the same function with the same weights.
    run = load_run(exported[0])
    for layer in run.model.gunn_layers():
        layer.impl = "keep_in"
    x = digit_batch(run.preprocessing, 3, tmp_path)
    with torch.no_grad():
        expected = run.model(x)
    export_run(run, tmp_path / "export", ("torchscript",))
    with torch.no_grad():
        scripted = torch.jit.load(str(tmp_path / "export" / "model.ts"))(x)
    torch.testing.assert_close(scripted, expected, atol=ATOL, rtol=0)


@pytest.fixture(scope="module")
def plain_weights(digits_run, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, folder) of `export.py --format safetensors` on the digits run."""
    run_dir = digits_run[1]
    out = tmp_path_factory.mktemp("plain")
    proc = run_entry("export.py", str(run_dir), "--out", str(out), "--format", "safetensors")
    assert "model.safetensors: max |logit difference|" in proc.stdout
    return run_dir, out


def test_safetensors_export_is_plain_weights_with_a_timm_config(
    plain_weights: tuple[Path, Path], tmp_path: Path
) -> None:
    run_dir, out = plain_weights
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "preprocessing.json",
        "classes.json",
    }
    run = load_run(run_dir)
    state = load_file(str(out / "model.safetensors"))
    assert state.keys() == run.model.state_dict().keys()  # no `model.` prefix
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == run.model_name
    cfg = config["pretrained_cfg"]
    pre = Preprocessing.read(out)
    assert cfg["input_size"] == [pre.in_chans, pre.crop, pre.crop]
    assert cfg["label_names"] == run.classes and cfg["num_classes"] == 10
    assert cfg["mean"] == list(pre.mean) * pre.in_chans  # grey digits: one value per channel
    model = create_model(
        config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(out / "model.safetensors")},
        **config["model_args"],
    ).eval()
    x = digit_batch(pre, 3, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(x), run.model(x), rtol=0, atol=0)


def test_safetensors_export_loads_in_timm(plain_weights: tuple[Path, Path], tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    pytest.importorskip("gunn_exp.timm")
    run_dir, out = plain_weights
    run = load_run(run_dir)
    x = digit_batch(Preprocessing.read(out), 2, tmp_path)
    from_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    built = timm.create_model(run.model_name, in_chans=3).eval()
    timm.models.load_checkpoint(built, str(out / "model.safetensors"))
    with torch.no_grad():
        for model in (from_folder, built):
            torch.testing.assert_close(model(x), run.model(x), rtol=0, atol=0)
    data = timm.data.resolve_data_config({}, model=from_folder)
    assert data["input_size"] == (3, 16, 16) and data["crop_pct"] == 1.0


def test_fine_tuning_starts_from_plain_weights(plain_weights: tuple[Path, Path]) -> None:
    run_dir, out = plain_weights
    run = load_run(run_dir)
    for source in (out / "model.safetensors", out):  # the file, or the export folder
        model = create_model(run.model_name, num_classes=3, in_chans=3)
        assert init_from_checkpoint(model, source, run.model_name) == ["fc.bias", "fc.weight"]
        tuned, trained = model.state_dict(), run.model.state_dict()
        for key in (k for k in trained if not k.startswith("fc.")):
            torch.testing.assert_close(tuned[key], trained[key], rtol=0, atol=0, msg=key)
