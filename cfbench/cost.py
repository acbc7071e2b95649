"""Measuring what a run costs: wall-clock (device-synchronised) and peak memory."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

import torch


class Stopwatch:
    """Accumulates seconds over `with` blocks; waits for queued CUDA work before reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Stopwatch:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for this run: Linux lets a process reset its RSS high-water mark."""
    # Elsewhere the peak stays the process's lifetime peak (ru_maxrss).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def available_memory_bytes() -> int | None:
    """Memory this machine can still give (Linux: MemAvailable; elsewhere the free pages where
    the OS reports them; None when unknown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def check_fits(nbytes: int, what: str, fix: str) -> None:
    """Refuse to build `what` when its estimated `nbytes` exceed the memory available, so a
    scenario too large fails in a line instead of an allocation error or the OOM killer.
    Raises ValueError, a scenario's bad option."""
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} need about {nbytes / 1e9:.1f} GB of memory, and "
                         f"{available / 1e9:.1f} GB is available; {fix}")


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_gpu_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
