"""The machine a measurement ran on, one description for every report.

Timings mean little without the hardware, the library versions and the load at the time (the
development machine's CPU is shared with other work), so each report keeps `machine(device)` in its
data and prints `describe(...)` of it above its tables.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from gunn_exp.analysis.units import GB


def resolve_device(name: str) -> torch.device:
    """`auto`: the CUDA device if there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    """Host, versions, CPU (cores, torch's threads, load average now) and GPU, by name."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / GB, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    if hasattr(os, "getloadavg"):  # other work on the machine slows every row
        info["load_average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    return info


def describe(info: dict[str, Any]) -> str:
    """One line: `host vm, python 3.12.3, torch 2.11.0+cu130, ...`."""
    return ", ".join(f"{k} {v}" for k, v in info.items())
