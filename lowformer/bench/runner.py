"""``lowformer bench`` as a library: every (model, image size, batch, threads, backend) measured, one record each.

Configurations are measured in interleaved rounds (every configuration once per round), so a change in the
machine's load spreads over all of them instead of landing on one; each record merges its rounds' samples.
``--jobs N`` runs the whole list in N processes at once, in lockstep (a barrier before every measurement),
and adds an aggregate record per configuration.
"""
from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lowformer.bench.backends import BACKENDS, Prepared, check_amp, prepare
from lowformer.bench.complexity import count_macs, count_params
from lowformer.bench.featured import build_model
from lowformer.models import resolve_model_name
from lowformer.bench.timing import environment, measure, merge, summarize
from lowformer.errors import LowformerError

__all__ = ["BenchConfig", "default_batch_size", "run_benchmark", "run_jobs"]

_logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """What to measure. Lists are swept; ``batch_size=None`` picks the mode's default for the device."""
    models: list[str]
    device: str = "cpu"
    mode: str = "throughput"
    batch_size: int | None = None
    image_sizes: list[int] = field(default_factory=lambda: [224])
    threads: list[int] = field(default_factory=lambda: [1])
    backends: list[str] = field(default_factory=lambda: ["eager"])
    iterations: int | None = None
    warmup: int = 10
    min_run_time: float = 1.0
    rounds: int = 1
    amp: str | None = None
    opset: int = 17
    deploy: bool = True
    jobs: int = 1
    onnx_cache: str | None = None
    skip_failures: bool = False


def _registry_name(name: str) -> str:
    """A model's registry name; a segmenter ``ARCH:BACKBONE`` is its own name."""
    from lowformer.segmentation import is_segmenter_spec
    return name if is_segmenter_spec(name) else resolve_model_name(name)


def default_batch_size(mode: str, device: str) -> int:
    """Batch 1 for latency; for throughput 200 on a GPU (the original's) and 16 on a CPU."""
    if mode == "latency":
        return 1
    return 200 if torch.device(device).type == "cuda" else 16


def _validate(config: BenchConfig) -> torch.device:
    if config.mode not in ("throughput", "latency"):
        raise LowformerError(f"unknown mode '{config.mode}': use throughput or latency")
    for backend in config.backends:
        if backend not in BACKENDS:
            raise LowformerError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    try:
        device = torch.device(config.device)
    except RuntimeError as e:
        raise LowformerError(f"bad --device '{config.device}': {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LowformerError("--device cuda given but no CUDA device is visible; use --device cpu")
    for backend in config.backends:
        check_amp(device, config.amp, backend)
    if config.iterations is not None and config.iterations < 1:
        raise LowformerError("--iterations must be at least 1 (or left out to time for --min-time seconds)")
    for name in config.models:
        _registry_name(name)
    return device


def _prepare_all(config: BenchConfig, device: torch.device, batch: int) -> dict[tuple, tuple[Prepared, dict]]:
    """Every configuration built and checked before any is timed, keyed (model, size, backend, threads).

    PyTorch backends are shared across thread counts (threads are set around each measurement); onnxruntime
    fixes its threads when the session is created, so it gets one session per thread count."""
    prepared: dict[tuple, tuple[Prepared, dict[str, Any]]] = {}
    for name in config.models:
        model = build_model(name, deploy=config.deploy).to(device)
        params = count_params(model)
        for size in config.image_sizes:
            cost = {"params": params, "macs": count_macs(model, (3, size, size))}
            x = torch.randn(batch, 3, size, size, device=device)
            for backend in config.backends:
                for threads in config.threads:
                    first = (name, size, backend, config.threads[0])
                    if backend != "onnxruntime" and threads != config.threads[0]:
                        if first in prepared:
                            prepared[(name, size, backend, threads)] = prepared[first]
                        continue
                    _logger.info("preparing %s %dx%d batch %d on %s", name, size, size, batch, backend)
                    target = copy.deepcopy(model) if backend == "channels_last" else model
                    try:
                        p = prepare(target, backend, x, amp=config.amp, opset=config.opset, threads=threads,
                                    cache_key=_registry_name(name),
                                    cache_dir=Path(config.onnx_cache) if config.onnx_cache else None)
                    except Exception as e:  # a backend that cannot take a model is a finding, not a crash
                        if not config.skip_failures:
                            raise
                        _logger.warning("skipped %s on %s at %d: %s: %s", name, backend, size, type(e).__name__,
                                        (str(e).splitlines() or [""])[0])
                        continue
                    prepared[(name, size, backend, threads)] = (p, cost)
    return prepared


def run_benchmark(config: BenchConfig, barrier: Any = None, job: int | None = None) -> list[dict[str, Any]]:
    """Measure every configuration of ``config``; one record per (model, size, batch, threads, backend).

    With ``config.skip_failures`` a backend that cannot prepare a model is logged and left out instead of
    ending the run. ``barrier`` (a multiprocessing barrier) is waited on before every measurement, to keep
    parallel jobs in lockstep."""
    device = _validate(config)
    batch = config.batch_size or default_batch_size(config.mode, config.device)
    env = environment(device, None)
    prepared = _prepare_all(config, device, batch)
    samples: dict[tuple, list] = {key: [] for key in prepared}
    loads: dict[tuple, float] = {}
    for round_ in range(config.rounds):
        _logger.info("round %d of %d: %d configurations", round_ + 1, config.rounds, len(prepared))
        for key, (p, _) in prepared.items():
            if barrier is not None:
                barrier.wait()
            loads.setdefault(key, os.getloadavg()[0])
            samples[key].append(measure(p.run, threads=key[3], warmup=config.warmup, iterations=config.iterations,
                                        min_run_time=config.min_run_time))
    records = []
    for key, (p, cost) in prepared.items():
        name, size, backend, threads = key
        timing = summarize(merge(samples[key]))
        records.append({
            "model": name, "registry_name": _registry_name(name), "backend": backend, "mode": config.mode,
            "batch_size": batch, "image_size": size, "device": env["device"], "device_type": env["device_type"],
            "threads": threads, "torch_version": env["torch_version"], "timm_version": env["timm_version"],
            "load_avg_1m": loads[key], "omp_wait_policy": env["omp_wait_policy"], "amp": config.amp or "fp32",
            "deployed": config.deploy, **timing, "images_per_s": batch * 1e3 / timing["median_ms"],
            "params": cost["params"], "macs": cost["macs"], "max_abs_diff": p.max_abs_diff,
            "rounds": config.rounds, "job": job, "jobs": config.jobs, **p.info,
        })
    return records


def _job_main(config: BenchConfig, job: int, barrier: Any, queue: Any) -> None:
    try:
        queue.put((job, run_benchmark(config, barrier=barrier, job=job), None))
    except Exception as e:  # reported by the parent, which owns the command line
        barrier.abort()
        queue.put((job, None, f"{type(e).__name__}: {e}"))


def run_jobs(config: BenchConfig, timeout: float = 3600.0) -> list[dict[str, Any]]:
    """``config.jobs`` processes measure ``config`` at once; per-process records plus one aggregate each.

    The aggregate's ``median_ms`` is the mean of the processes' medians (the original's "Meanmed": latency
    under contention), ``min_ms`` the smallest minimum and ``images_per_s`` the sum over processes."""
    if config.jobs < 2:
        return run_benchmark(config)
    _validate(config)
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(config.jobs), ctx.Queue()
    procs = [ctx.Process(target=_job_main, args=(config, j, barrier, queue), daemon=True) for j in range(config.jobs)]
    for proc in procs:
        proc.start()
    results, errors = {}, []
    try:
        for _ in procs:
            job, records, error = queue.get(timeout=timeout)
            if error:
                errors.append(f"job {job}: {error}")
            else:
                results[job] = records
    finally:
        for proc in procs:
            proc.join(timeout=10)
    if errors:
        raise LowformerError(f"parallel benchmark failed: {errors[0]}")
    per_job = [r for j in sorted(results) for r in results[j]]
    return per_job + _aggregate(per_job)


def _aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["model"], r["image_size"], r["backend"], r["threads"]), []).append(r)
    out = []
    for rs in groups.values():
        agg = dict(rs[0], job="all")
        agg["median_ms"] = sum(r["median_ms"] for r in rs) / len(rs)
        agg["mean_ms"] = sum(r["mean_ms"] for r in rs) / len(rs)
        agg["min_ms"] = min(r["min_ms"] for r in rs)
        agg["iqr_ms"] = max(r["iqr_ms"] for r in rs)
        agg["images_per_s"] = sum(r["images_per_s"] for r in rs)
        agg["samples"] = sum(r["samples"] for r in rs)
        agg["load_avg_1m"] = min(r["load_avg_1m"] for r in rs)
        agg["noisy"] = any(r["noisy"] for r in rs)
        out.append(agg)
    return out
