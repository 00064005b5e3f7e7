"""Timing a forward pass with ``torch.utils.benchmark``: warm-up excluded, thread count explicit,
median and minimum over blocks, and the environment recorded with every figure."""
from __future__ import annotations

import os
import platform
from typing import Any, Callable

import torch
from torch.utils.benchmark import Timer

__all__ = ["environment", "time_callable"]


def environment(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a timing depends on: device name, torch version, threads and the load at the start."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": name, "device_type": device.type, "torch_version": torch.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_callable(fn: Callable[[], Any], threads: int = 1, min_run_time: float = 1.0) -> dict[str, float]:
    """Median and minimum milliseconds per call of ``fn``.

    ``blocked_autorange`` grows the block size first, which doubles as warm-up; each block gives one
    sample, so the minimum is over per-block averages."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_ms": m.median * 1e3, "min_ms": min(m.times) * 1e3, "iqr_ms": m.iqr * 1e3,
            "samples": len(m.times), "calls_per_sample": m.number_per_run}
