"""The GPU check's report: `gpu_<device>.json` holds every part's result, `.md` is `markdown`
of it (the committed `benchmarks/gpu_nvidia_h200*.md` are exactly that)."""

from __future__ import annotations

import json
from typing import Any

import torch

from gunn_exp.analysis.machine import describe
from gunn_exp.analysis.tables import markdown_table

TITLES = {
    "exactness": "1. Exactness vs reference (max relative error)",
    "throughput": "2. Training-step throughput",
    "large": "3. GUNN-18 at ImageNet size",
    "end_to_end": "4. End to end: train.py, resume, eval.py",
    "packing": "5. Runs packed on one device",
}

_EXACTNESS_COLUMNS = [
    "impl",
    "precision",
    "update",
    "output",
    "grad x",
    "grad params",
    "BN stats",
    "tolerance",
    "ok",
]
_THROUGHPUT_COLUMNS = [
    "model",
    "mode",
    "batch",
    "img_per_s",
    "vs_yardstick",
    "step_ms",
    "peak_mb",
    "compile_s",
    "kernels_per_step",
]
_PACKING_COLUMNS = ["runs", "img_per_s", "vs_one_run", "per_run_img_per_s", "peak_mb_per_run"]

_THROUGHPUT_NOTE = (
    "bf16 autocast (GPU), channels_last, SGD (fused on GPU); median of interleaved blocks. "
    "vs_yardstick: img/s over the yardstick's in the same mode and batch. peak_mb: "
    "max_memory_allocated (CPU: peak RSS) during the steps above what was allocated before them "
    "(model, optimizer state and CUDA-graph pools excluded), in MB of 2**20 bytes. compile_s: "
    "first two steps minus two steady ones. kernels: GPU activities per step (profiler; CPU: the "
    "innermost ATen operators that do work, as benchmark.py counts them)."
)


def one_line(err: BaseException) -> str:
    """`RuntimeError: its first line`, for a report's list of failures."""
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"


def device_slug(device: torch.device) -> str:
    """The report's file name part: `nvidia_h200`, or `cpu`."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return markdown_table(columns, [[r.get(c, "") for c in columns] for r in rows])


def _packing_note(result: dict[str, Any]) -> str:
    return (
        f"{result['model']}, {result['mode']}, batch {result['batch']} per run, "
        f"{result['threads_per_run']} CPU threads per run; each run a process, all "
        f"timed over the same {result['window_s']:g} s window. img_per_s: summed over "
        "the runs; vs_one_run: over one run alone; peak_mb_per_run: the largest run's "
        "max_memory_allocated during the window above what it held before, in MB of 2**20 bytes "
        "(the CUDA context, about 0.5 GB a process, not included). Ready in "
        f"{result['first_run_ready_s']:.0f} s (first run, cold caches), "
        f"{result['other_runs_ready_s']:.0f} s (the others, together)."
    )


def _part(key: str, result: dict[str, Any]) -> list[str]:
    """The Markdown lines of one part's result."""
    if key == "exactness":
        table = _table(result["rows"], _EXACTNESS_COLUMNS)
        return [result["layer"], "", table, "", *(f"- {f}" for f in result["failures"]), ""]
    if key == "throughput":
        table = _table(result["rows"], _THROUGHPUT_COLUMNS)
        return [_THROUGHPUT_NOTE, "", table, "", *(f"- {s}" for s in result["skipped"]), ""]
    if key == "packing":
        table = _table(result["rows"], _PACKING_COLUMNS)
        return [_packing_note(result), "", table, "", *(f"- {s}" for s in result["skipped"]), ""]
    return ["```json", json.dumps(result, indent=1), "```", ""]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check: {m.get('gpu', 'CPU only')}",
        "",
        f"Measured {report['started']} in {report['total_s']:.0f} s. `{report['command']}`",
        "",
        describe(m),
        "",
    ]
    if not report["plan"]["gpu"]:
        lines += [
            "**No CUDA device: this is the tiny CPU version of every part (gunn_mini, toy shapes, "
            "compile with aot_eager). Its numbers say nothing about a GPU; GPU numbers need a "
            "GPU.**",
            "",
        ]
    for key, title in TITLES.items():
        part = report["parts"].get(key, {})
        lines += [
            f"## {title}",
            "",
            f"status: **{part.get('status', 'not run')}** ({part.get('seconds', 0):.0f} s)",
            "",
        ]
        if "error" in part:
            lines += ["```", part["error"], "```", ""]
        if part.get("result"):
            lines += _part(key, part["result"])
    return "\n".join(lines)
