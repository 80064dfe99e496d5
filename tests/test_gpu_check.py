"""`python -m gunn_exp.analysis.gpu_check` without CUDA: the tiny CPU version of every part runs and
reports (the GPU numbers themselves need a GPU; see README "On a GPU machine")."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, RUN_ENV

from gunn_exp.analysis.gpu_check.end_to_end import write_fake_cifar10
from gunn_exp.analysis.gpu_check.packing import fastest_mode
from gunn_exp.analysis.gpu_check.plan import CPU_PLAN
from gunn_exp.analysis.gpu_check.report import markdown
from gunn_exp.analysis.gpu_check.run import main
from gunn_exp.data.cifar import CIFARDataModule
from gunn_exp.models import IMPLEMENTATIONS
from gunn_exp.models.layer import DEFAULT_IMPL

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU version")

CASES = ("float32 gradual", "float32 simultaneous", "bf16 autocast, channels_last gradual")


@pytest.fixture(scope="module")
def exactness(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("report")
    report = main(["--parts", "exactness", "--out", str(out)])
    assert (out / "gpu_cpu.md").read_text().count("GPU numbers need a GPU") == 1
    assert json.loads((out / "gpu_cpu.json").read_text())["parts"].keys() == {"exactness"}
    return report["parts"]["exactness"]["result"]


def _rows(result: dict, case: str) -> dict[str, dict]:
    return {r["impl"]: r for r in result["rows"] if f"{r['precision']} {r['update']}" == case}


# The default implementation is also checked compiled (the CPU version: aot_eager).
COMPILED = f"{DEFAULT_IMPL}, compiled (aot_eager)"


def test_exactness_covers_every_implementation(exactness: dict) -> None:
    others = set(IMPLEMENTATIONS) - {"reference"} | {COMPILED}
    for case in CASES[:2]:
        assert set(_rows(exactness, case)) == others, case
    # bf16: the bf16 reference's own error against float32 sets the tolerance and is reported.
    assert set(_rows(exactness, CASES[2])) == set(IMPLEMENTATIONS) | {COMPILED}
    # bf16 keeps 8 bits of mantissa: gradients summed over a layer drift by tens of percent, not
    # by orders of magnitude (a broken autocast path would).
    assert 0 < _rows(exactness, CASES[2])["reference"]["grad x"] < 0.5


@pytest.mark.parametrize("case", CASES[:2])
def test_float32_implementations_match_reference(exactness: dict, case: str) -> None:
    for impl, row in _rows(exactness, case).items():
        assert row["ok"] is True, (impl, row)
        assert max(row[k] for k in ("output", "grad x", "grad params", "BN stats")) < 1e-4


@pytest.mark.parametrize(
    "impl",
    sorted(set(IMPLEMENTATIONS) - {"reference"} | {COMPILED}),
)
def test_bf16_autocast_implementations_match_reference(exactness: dict, impl: str) -> None:
    row = _rows(exactness, CASES[2])[impl]
    assert row["ok"] is True, row


def test_fake_cifar10_is_read_by_the_data_module(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, n_train=10, n_test=4)
    data = CIFARDataModule(
        "cifar10", data_dir=str(tmp_path), download=False, verify_checksums=False, batch_size=4
    )
    data.prepare_data()
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape[1:] == (3, 32, 32) and labels.max() < 10
    with (tmp_path / "cifar-10-batches-py" / "batches.meta").open("rb") as f:
        assert len(pickle.load(f)["label_names"]) == 10


@pytest.mark.slow
def test_cpu_version_runs_every_part(tmp_path: Path) -> None:
    """The whole command as `make gpu-check` runs it (about 2-3 minutes on a shared CPU)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gunn_exp.analysis.gpu_check",
            "--out",
            str(tmp_path),
            "--budget-factor",
            "3",
        ],
        cwd=ROOT,
        env=RUN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = json.loads((tmp_path / "gpu_cpu.json").read_text())
    parts = report["parts"]
    for name in ("throughput", "large", "end_to_end", "packing"):
        assert parts[name]["status"] == "ok", (name, parts[name], proc.stderr[-3000:])
    plan = CPU_PLAN
    rows = parts["throughput"]["result"]["rows"]
    expected = {(f"{plan.model} {i}", m) for i in plan.impls for m in plan.modes}
    expected |= {(plan.yardstick, m) for m in plan.modes}
    assert {(r["model"], r["mode"]) for r in rows} == expected
    assert all(r["img_per_s"] > 0 and r["kernels_per_step"] > 0 for r in rows)
    assert parts["large"]["result"]["img_per_s"] > 0
    e2e = parts["end_to_end"]["result"]
    assert e2e["epochs"] == 3 and e2e["eval_outputs"]
    packing = parts["packing"]["result"]
    assert [r["runs"] for r in packing["rows"]] == list(plan.pack_runs)
    assert all(r["img_per_s"] > 0 for r in packing["rows"])
    assert packing["mode"] == fastest_mode(report, plan)
    # The exit status reports the exactness part's verdict (a failed part exits 1).
    assert proc.returncode == (0 if parts["exactness"]["status"] == "ok" else 1)
    assert "GPU numbers need a GPU" in (tmp_path / "gpu_cpu.md").read_text()


def test_packing_uses_the_fastest_mode_of_the_default_implementation() -> None:
    plan = CPU_PLAN
    rows = [
        {"model": f"{plan.model} {DEFAULT_IMPL}", "mode": "eager", "img_per_s": 10.0},
        {"model": f"{plan.model} {DEFAULT_IMPL}", "mode": "compile", "img_per_s": 12.0},
        {"model": plan.yardstick, "mode": "eager", "img_per_s": 99.0},
    ]
    report = {"parts": {"throughput": {"result": {"rows": rows}}}}
    assert fastest_mode(report, plan) == "compile"
    rows[0]["img_per_s"] = 13.0
    assert fastest_mode(report, plan) == "eager"
    # Without part 2's rows: eager, which every implementation runs.
    assert fastest_mode({"parts": {}}, plan) == "eager"


@pytest.mark.parametrize("report", sorted((ROOT / "benchmarks").glob("gpu_*.json")), ids=str)
def test_committed_reports_are_what_the_code_writes(report: Path) -> None:
    """Each committed GPU report's Markdown is `markdown` of its JSON: the format is kept."""
    expected = report.with_suffix(".md").read_text()
    assert markdown(json.loads(report.read_text())) == expected
