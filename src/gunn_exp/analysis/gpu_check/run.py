"""`main`: parse the GPU check's flags, run the chosen parts within their budgets, and write the
report after each one (a run cut short, a lease ending, keeps what it measured)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import gunn_exp.analysis.gpu_check as package
from gunn_exp.analysis.gpu_check.end_to_end import ROOT, end_to_end
from gunn_exp.analysis.gpu_check.exactness import check_exactness
from gunn_exp.analysis.gpu_check.packing import fastest_mode, packing
from gunn_exp.analysis.gpu_check.plan import CPU_PLAN, GPU_PLAN, MODES, quick
from gunn_exp.analysis.gpu_check.report import device_slug, markdown, one_line
from gunn_exp.analysis.gpu_check.throughput import large_step, throughput
from gunn_exp.analysis.machine import machine, resolve_device


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=package.__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one batch size, half the budgets")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks", help="report folder")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    parser.add_argument(
        "--budget-factor",
        type=float,
        default=1.0,
        help="multiply every part's time budget (e.g. 2 on a node with a slow CPU)",
    )
    parser.add_argument(
        "--parts",
        default="exactness,throughput,large,end_to_end,packing",
        help="comma-separated subset of the parts to run",
    )
    parser.add_argument("--modes", help=f"comma-separated subset of {','.join(MODES)} (part 2)")
    parser.add_argument("--impls", help="comma-separated layer implementations (part 2)")
    parser.add_argument("--batches", help="comma-separated batch sizes (part 2)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the GPU check as the command line `argv` asks; returns the report it wrote."""
    parser = _parser()
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    plan = GPU_PLAN if device.type == "cuda" else CPU_PLAN
    plan = quick(plan) if args.quick else plan
    plan = replace(plan, budgets={k: v * args.budget_factor for k, v in plan.budgets.items()})
    if args.modes:
        plan = replace(plan, modes=tuple(args.modes.split(",")))
    if args.impls:
        plan = replace(plan, impls=tuple(args.impls.split(",")))
    if args.batches:
        plan = replace(plan, batches=tuple(int(b) for b in args.batches.split(",")))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what trainer=gpu sets
    command = shlex.join(["python", "-m", package.__name__, *(argv or sys.argv[1:])])
    report: dict[str, Any] = {
        "command": command,
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(device),
        "plan": dict(plan.__dict__),
        "parts": {},
    }
    functions = {
        "exactness": check_exactness,
        "throughput": throughput,
        "large": large_step,
        "end_to_end": end_to_end,
        # Packs the default implementation in the mode part 2 found fastest (when it ran).
        "packing": lambda plan, device, deadline: packing(
            plan, device, deadline, fastest_mode(report, plan)
        ),
    }
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(functions))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(functions)}")
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"gpu_{device_slug(device)}"
    for name in wanted:
        t0 = time.monotonic()
        print(f"[gpu_check] {name} (budget {plan.budgets[name]:.0f} s) ...", flush=True)
        try:
            result = functions[name](plan, device, t0 + plan.budgets[name])
            failed = bool(result.get("failures")) if isinstance(result, dict) else False
            part = {"status": "FAILED" if failed else "ok", "result": result}
        except Exception as err:  # noqa: BLE001 (recorded; the next part still runs)
            part = {"status": "FAILED", "error": traceback.format_exc(limit=3)[-3000:]}
            print(f"[gpu_check] {name} failed: {one_line(err)}", flush=True)
        part["seconds"] = time.monotonic() - t0
        report["parts"][name] = part
        print(f"[gpu_check] {name}: {part['status']} in {part['seconds']:.0f} s", flush=True)
        # Written after every part: a run cut short (a lease ending) keeps what it measured.
        report["total_s"] = time.monotonic() - start
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {stem}.md and {stem}.json")
    return report
