"""``lowformer bench`` as a library: every (model, image size, batch, threads, backend) measured, one record each.

Configurations are measured in interleaved rounds (every configuration once per round), so a change in the
machine's load spreads over all of them instead of landing on one; each record merges its rounds' samples.
``--jobs N`` runs the whole list in N processes at once, in lockstep (a barrier before every measurement),
and adds an aggregate record per configuration.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lowformer.bench.complexity import count_macs, count_params
from lowformer.bench.featured import build_model
from lowformer.bench.results import OUTPUT_SUFFIXES, PLOT_SUFFIXES, plot_records, write_records
from lowformer.bench.timing import MIN_SAMPLES, environment, interleave, summarize
from lowformer.deploy.backends import Prepared, check_amp, check_device, get_backend, parse_device, prepare
from lowformer.deploy.onnx import OPSET, check_opset
from lowformer.errors import LowformerError
from lowformer.files import check_output_path
from lowformer.models import resolve_model_name

__all__ = ["BenchConfig", "benchmark", "default_batch_size", "default_threads", "require_at_least", "resolve",
           "run_benchmark", "run_jobs"]

_logger = logging.getLogger(__name__)


@dataclass
class BenchConfig:
    """What to measure. Lists are swept; ``batch_size=None`` picks the mode's default for the device and
    ``threads=None`` the machine's threads shared out among ``jobs``; ``jobs > 1`` measures latency.
    ``image_sizes=None`` times classifiers at 224x224 and each detector / segmenter ``ARCH:BACKBONE`` at its
    test size (:func:`lowformer.dense.dense_test_size`); a given square size is used for every model."""
    models: list[str]
    device: str = "cpu"
    mode: str = "throughput"
    batch_size: int | None = None
    image_sizes: list[int] | None = None
    threads: list[int] | None = None
    backends: list[str] = field(default_factory=lambda: ["eager"])
    iterations: int | None = None
    warmup: int = 10
    min_run_time: float = 1.0
    min_samples: int = MIN_SAMPLES
    rounds: int = 1
    amp: str | None = None
    opset: int = OPSET
    deploy: bool = True
    jobs: int = 1
    onnx_cache: str | None = None
    skip_failures: bool = False


def _registry_name(name: str) -> str:
    """A model's registry name; a detector or segmenter ``ARCH:BACKBONE`` is its own name (its backbone checked)."""
    from lowformer.dense import parse_dense_spec
    spec = parse_dense_spec(name)
    if spec is not None:
        resolve_model_name(spec.backbone)
        return name
    return resolve_model_name(name)


# Detectors return per-image dicts after data-dependent post-processing, which the tracing and exporting
# backends cannot take; `lowformer export` writes their ONNX graph.
_DETECTOR_BACKENDS = ("eager", "channels_last")


def _check_dense_backends(name: str, backends: Sequence[str]) -> None:
    from lowformer.dense import parse_dense_spec
    spec = parse_dense_spec(name)
    if spec is not None and spec.task == "detection":
        other = [b for b in backends if b not in _DETECTOR_BACKENDS]
        if other:
            raise LowformerError(f"{name}: detectors are timed with the {' or '.join(_DETECTOR_BACKENDS)} backend, "
                                 f"not {other[0]} (their post-processing does not trace); export one to ONNX with "
                                 f"`lowformer export {name} --format onnx --out FILE`")


def _sizes(model: torch.nn.Module, image_sizes: list[int] | None) -> list[tuple[int, int]]:
    """(height, width) to time ``model`` at: the given squares, else its test size (224 for a classifier)."""
    from lowformer.dense import dense_test_size
    if image_sizes:
        return [(s, s) for s in image_sizes]
    return [dense_test_size(model) or (224, 224)]


def default_batch_size(mode: str, device: str) -> int:
    """Batch 1 for latency; for throughput 200 on a GPU (the original's) and 16 on a CPU."""
    if mode == "latency":
        return 1
    return 200 if torch.device(device).type == "cuda" else 16


def default_threads(jobs: int = 1) -> int:
    """The machine's intra-op threads (torch's default) shared out among ``jobs`` processes, at least one each."""
    return max(1, torch.get_num_threads() // max(jobs, 1))


def require_at_least(value: Any, low: int | float, name: str, what: str) -> None:
    """One LowformerError naming ``name`` and ``what`` to give unless ``value`` is a number >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise LowformerError(f"{name} {value!r} is out of range: {what}")


def resolve(config: BenchConfig) -> BenchConfig:
    """``config`` checked (every range, name and device, before any work) with its defaults filled in: the
    mode's batch size, latency for ``jobs > 1`` and the threads shared out among the jobs."""
    if not config.models:
        raise LowformerError("no model given: name one or more, e.g. `lowformer bench lowformer_b1 fastvit_t8`")
    if config.mode not in ("throughput", "latency"):
        raise LowformerError(f"unknown mode '{config.mode}': use throughput or latency")
    device = parse_device(config.device)
    require_at_least(config.jobs, 1, "--jobs", "give at least 1 process")
    if config.batch_size is not None:
        require_at_least(config.batch_size, 1, "--batch-size", "give at least 1 (or leave it out for the mode's default)")
    if config.image_sizes is not None and not config.image_sizes:
        raise LowformerError("--image-size needs at least one size")
    for size in config.image_sizes or []:
        require_at_least(size, 1, "--image-size", "give a side of at least 1 pixel")
    if config.threads is not None:
        if not config.threads:
            raise LowformerError("--threads needs at least one count")
        for threads in config.threads:
            require_at_least(threads, 1, "--threads", "give at least 1 thread")
    if config.iterations is not None:
        require_at_least(config.iterations, 1, "--iterations", "time at least 1 pass (or leave it out to time for --min-time)")
    require_at_least(config.warmup, 0, "--warmup", "give 0 or more untimed passes")
    require_at_least(config.rounds, 1, "--rounds", "give at least 1 round")
    require_at_least(config.min_samples, 1, "--min-samples", "give at least 1 sample")
    if isinstance(config.min_run_time, bool) or not isinstance(config.min_run_time, (int, float)) \
            or not config.min_run_time > 0:
        raise LowformerError(f"--min-time {config.min_run_time!r} is out of range: give a positive number of seconds")
    check_opset(config.opset)
    if not config.backends:
        raise LowformerError("--backend needs at least one backend")
    for backend in config.backends:
        check_device(device, backend)
        check_amp(device, config.amp, backend)
    for name in config.models:
        _registry_name(name)
        _check_dense_backends(name, config.backends)
    mode = "latency" if config.jobs > 1 else config.mode
    threads = config.threads or [default_threads(config.jobs)]
    cpus = os.cpu_count() or 1
    if config.jobs * max(threads) > cpus:
        _logger.warning("%d jobs x %d threads exceed the %d CPUs: the jobs will slow each other down", config.jobs,
                        max(threads), cpus)
    return dataclasses.replace(config, mode=mode, threads=list(threads),
                               batch_size=config.batch_size or default_batch_size(mode, config.device))


def _prepare_all(config: BenchConfig, device: torch.device) -> dict[tuple, tuple[Prepared, dict]]:
    """Every configuration built and checked before any is timed, keyed (model, size, backend, threads).

    A backend that fixes its threads at creation (``owns_threads``: ONNX Runtime sessions) is prepared once per
    thread count; the others share one runner across thread counts (threads are set around each measurement)."""
    from lowformer.dense import cost_module, set_dense_test_size
    prepared: dict[tuple, tuple[Prepared, dict[str, Any]]] = {}
    for name in config.models:
        model = build_model(name, deploy=config.deploy).to(device)
        params = count_params(model)
        for size in _sizes(model, config.image_sizes):
            set_dense_test_size(model, *size)
            cost = {"params": params, "macs": count_macs(cost_module(model), (3, *size))}
            x = torch.randn(config.batch_size, 3, *size, device=device)
            for backend in config.backends:
                owns_threads = get_backend(backend).owns_threads
                for threads in config.threads:
                    first = (name, size, backend, config.threads[0])
                    if not owns_threads and threads != config.threads[0]:
                        if first in prepared:
                            prepared[(name, size, backend, threads)] = prepared[first]
                        continue
                    _logger.info("preparing %s %dx%d batch %d on %s (%d threads)", name, size[1], size[0],
                                 config.batch_size, backend, threads)
                    try:
                        p = prepare(model, backend, x, threads=threads, amp=config.amp, opset=config.opset,
                                    cache_key=_registry_name(name),
                                    cache_dir=Path(config.onnx_cache) if config.onnx_cache else None)
                    except Exception as e:  # a backend that cannot take a model is a finding, not a crash
                        if not config.skip_failures:
                            raise
                        _logger.warning("skipped %s on %s at %s: %s: %s", name, backend, size, type(e).__name__,
                                        (str(e).splitlines() or [""])[0])
                        continue
                    prepared[(name, size, backend, threads)] = (p, cost)
    return prepared


def run_benchmark(config: BenchConfig, barrier: Any = None, job: int | None = None) -> list[dict[str, Any]]:
    """Measure every configuration of ``config``; one record per (model, size, batch, threads, backend).

    With ``config.skip_failures`` a backend that cannot prepare a model is logged and left out instead of
    ending the run. ``barrier`` (a multiprocessing barrier) is waited on before every measurement, to keep
    parallel jobs in lockstep."""
    config = resolve(config)
    device = torch.device(config.device)
    env = environment(device, None)
    prepared = _prepare_all(config, device)
    loads: dict[tuple, float] = {}

    def before(key: tuple) -> None:
        if barrier is not None:
            barrier.wait()
        loads.setdefault(key, os.getloadavg()[0])

    _logger.info("%d rounds of %d configurations", config.rounds, len(prepared))
    measured = interleave({key: p.run for key, (p, _) in prepared.items()}, {key: key[3] for key in prepared},
                          rounds=config.rounds, warmup=config.warmup, iterations=config.iterations,
                          min_run_time=config.min_run_time, min_samples=config.min_samples, before=before)
    records = []
    for key, (p, cost) in prepared.items():
        name, size, backend, threads = key
        timing = summarize(measured[key])
        records.append({
            "model": name, "registry_name": _registry_name(name), "backend": backend, "mode": config.mode,
            "batch_size": config.batch_size, "image_size": size[0], "image_width": size[1], "device": env["device"],
            "device_type": env["device_type"], "threads": threads, "torch_version": env["torch_version"],
            "timm_version": env["timm_version"], "load_avg_1m": loads[key], "omp_wait_policy": env["omp_wait_policy"],
            "cpu_flags": env["cpu_flags"], "amp": config.amp or "fp32", "deployed": config.deploy, **timing,
            "images_per_s": config.batch_size * 1e3 / timing["median_ms"], "params": cost["params"],
            "macs": cost["macs"], "max_abs_diff": p.check["max_abs_diff"], "min_cosine": p.check["min_cosine"],
            "lossy": get_backend(backend).lossy, "rounds": config.rounds, "job": job, "jobs": config.jobs, **p.info,
        })
    return records


def benchmark(config: BenchConfig, outputs: Sequence[str | os.PathLike] = (),
              plot: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """``lowformer bench`` as one call: check ``config`` and the output paths (writable, ``.json`` / ``.csv`` for
    ``outputs``, ``.png`` / ``.pdf`` / ``.svg`` for ``plot``) before any work, measure (in ``config.jobs``
    processes when more than one), then write the records and the plot."""
    outputs = [check_output_path(path, OUTPUT_SUFFIXES, "--out") for path in outputs]
    plot = check_output_path(plot, PLOT_SUFFIXES, "--plot") if plot is not None else None
    records = run_jobs(config)
    for path in outputs:
        write_records(path, records)
    if plot is not None:
        plot_records(records, plot)
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
    config = resolve(config)
    if config.jobs < 2:
        return run_benchmark(config)
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
