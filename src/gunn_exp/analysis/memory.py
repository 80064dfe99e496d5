"""Peak memory of a block of training steps: the CUDA allocator's peak, or the process's peak RSS.

On CUDA, `max_memory_allocated` since a reset. On CPU the kernel's high-water mark of the process
(VmHWM in /proc/self/status), which writing 5 to /proc/self/clear_refs resets to the current RSS;
glibc's malloc is trimmed first so that the RSS at the start is what is live. glibc also raises its
mmap threshold after the first large free, after which RSS depends on which model ran before:
`pin_malloc` fixes it before anything is allocated (same allocator rules for every model).
"""

from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _libc() -> ctypes.CDLL | None:
    """glibc, where there is one (malloc_trim and mallopt are glibc's)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def pin_malloc(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold: large buffers come from and go back to the OS every time."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """`reset()` before a block, `read()` after it: (peak, rise over the start) in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_peak = device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK)
        self.libc = _libc()
        self.start = 0

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        elif self.cpu_peak:
            if self.libc is not None:
                self.libc.malloc_trim(0)  # give freed heap pages back, so RSS is what is live
            self.start = _proc_status_bytes("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def read(self) -> tuple[float, float]:
        """(peak, peak - start) in bytes since `reset`; NaN where neither measure exists."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.cpu_peak:
            peak = _proc_status_bytes("VmHWM")
        else:
            return float("nan"), float("nan")
        return peak, peak - self.start
