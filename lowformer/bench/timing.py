"""Timing a forward pass with ``torch.utils.benchmark``: warm-up excluded, thread count explicit,
median and minimum over samples, and the environment recorded with every figure."""
from __future__ import annotations

import os
import platform
from typing import Any, Callable, TypeVar

import torch
from torch.utils.benchmark import Measurement, Timer
from torch.utils.benchmark.utils.common import TaskSpec, set_torch_threads
from torch.utils.benchmark.utils.timer import timer as synchronised_clock

from lowformer.deploy.cpu import cpu_features

__all__ = ["MIN_SAMPLES", "environment", "interleave", "measure", "merge", "summarize", "time_callable"]

K = TypeVar("K")


def environment(device: torch.device | str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """What a timing depends on: device name, torch version, threads and the load at the start."""
    import timm
    device = torch.device(device)
    cpu = cpu_features()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = cpu.model_name or platform.processor() or platform.machine()
    return {
        "device": name, "device_type": device.type, "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0], "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "cpu_flags": " ".join(cpu.flags),
    }


# Samples a measurement takes at least when it times for a duration: with fewer, the quartiles (and so the
# noise flag) mean little; a batch-16 CPU pass of ~0.2 s gave 4-6 samples in one second.
MIN_SAMPLES = 10


def measure(fn: Callable[[], Any], threads: int = 1, warmup: int = 10, iterations: int | None = None,
            min_run_time: float = 1.0, min_samples: int = MIN_SAMPLES,
            clock: Callable[[], float] = synchronised_clock) -> Measurement:
    """Time ``fn`` after ``warmup`` untimed calls.

    With ``iterations``, exactly that many calls are timed one by one (the original's per-pass protocol);
    without, ``Timer.blocked_autorange`` picks a block size and repeats blocks for ``min_run_time`` seconds,
    then adds blocks until there are ``min_samples``. The default clock synchronises the accelerator before
    each reading, so GPU work is inside the sample."""
    with set_torch_threads(threads):
        for _ in range(warmup):
            fn()
        if iterations is None:
            timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=clock)
            m = timer.blocked_autorange(min_run_time=min_run_time)
            times = list(m.raw_times)
            while len(times) < min_samples:
                times += timer.timeit(m.number_per_run).raw_times
            return Measurement(number_per_run=m.number_per_run, raw_times=times, task_spec=m.task_spec)
        times = []
        for _ in range(iterations):
            start = clock()
            fn()
            times.append(clock() - start)
    return Measurement(number_per_run=1, raw_times=times, task_spec=TaskSpec("fn()", "", num_threads=threads))


def interleave(fns: dict[K, Callable[[], Any]], threads: dict[K, int] | int = 1, rounds: int = 1, warmup: int = 10,
               iterations: int | None = None, min_run_time: float = 1.0, min_samples: int = MIN_SAMPLES,
               before: Callable[[K], None] | None = None) -> dict[K, Measurement]:
    """Measure every callable once per round, ``rounds`` times, and merge each one's samples: a change in the
    machine's load spreads over all candidates instead of landing on one. ``before(key)`` runs before each
    measurement (a barrier, a load reading)."""
    samples: dict[K, list[Measurement]] = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            if before is not None:
                before(key)
            samples[key].append(measure(fn, threads=threads[key] if isinstance(threads, dict) else threads,
                                        warmup=warmup, iterations=iterations, min_run_time=min_run_time,
                                        min_samples=min_samples))
    return {key: merge(ms) for key, ms in samples.items()}


def merge(measurements: list[Measurement]) -> Measurement:
    """One measurement of the per-call times of several (e.g. the interleaved rounds of one configuration)."""
    if len(measurements) == 1:
        return measurements[0]
    times = [t for m in measurements for t in m.times]
    return Measurement(number_per_run=1, raw_times=times, task_spec=measurements[0].task_spec)


def summarize(m: Measurement) -> dict[str, Any]:
    """Milliseconds per call: median, minimum, mean and IQR over samples (each sample averages a block).

    ``noisy`` flags a figure to distrust: IQR above 10 % of the median, or fewer than 3 samples."""
    return {"median_ms": m.median * 1e3, "min_ms": min(m.times) * 1e3, "mean_ms": m.mean * 1e3,
            "iqr_ms": m.iqr * 1e3, "samples": len(m.times), "calls_per_sample": m.number_per_run,
            "noisy": bool(m.has_warnings) or len(m.times) < 3}


def time_callable(fn: Callable[[], Any], threads: int = 1, min_run_time: float = 1.0) -> dict[str, float]:
    """Median and minimum milliseconds per call of ``fn`` (warm-up, then ``blocked_autorange``)."""
    return summarize(measure(fn, threads=threads, warmup=2, min_run_time=min_run_time))
