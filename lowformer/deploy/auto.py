"""``lowformer.deploy(model, precision="auto")``: try the paths this CPU can run, keep the fastest that is accurate.

The candidates depend on the CPU (:mod:`lowformer.deploy.cpu`): fp32 in PyTorch, ONNX Runtime and OpenVINO on
the deploy export everywhere; bf16 (PyTorch and OpenVINO) only where the CPU has native bf16; int8 (ONNX Runtime,
8-bit weights with VNNI and 7-bit without, and OpenVINO through NNCF) when calibration images are given. Each is
built, checked against the eager model on the check images (the calibration images, else the example input),
then all are timed on the example input in interleaved rounds. The fastest whose lowest per-image cosine to the
eager outputs reaches ``min_cosine`` wins (fp32 paths must also pass the exact 1e-4 check, which their builds
enforce); ``module.report`` lists every candidate's time and cosine, the CPU and why the winner won.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from lowformer.deploy.check import compare_outputs
from lowformer.deploy.cpu import cpu_features
from lowformer.errors import LowformerError

__all__ = ["CANDIDATES", "candidate_names", "deploy_auto"]

_logger = logging.getLogger(__name__)

# name -> (runtime, precision, needs): what each candidate is and what it needs from the CPU / the caller
CANDIDATES: dict[str, tuple[str, str, str]] = {
    "pytorch-fp32": ("pytorch", "fp32", ""),
    "onnxruntime-fp32": ("onnxruntime", "fp32", ""),
    "openvino-fp32": ("openvino", "fp32", ""),
    "pytorch-bf16": ("pytorch", "bf16", "bf16"),
    "openvino-bf16": ("openvino", "bf16", "bf16"),
    "onnxruntime-int8": ("onnxruntime", "int8", "calibration"),
    "openvino-int8": ("openvino", "int8", "calibration"),
}


def _bf16_native() -> bool:
    return cpu_features().bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def candidate_names(calibration: bool) -> list[str]:
    """The candidates worth trying on this CPU (bf16 only with native bf16; int8 only with calibration)."""
    have = {"": True, "bf16": _bf16_native(), "calibration": calibration}
    return [name for name, (_, _, needs) in CANDIDATES.items() if have[needs]]


def _build(name: str, model: nn.Module, x: torch.Tensor, batches: list[torch.Tensor], threads: int) -> nn.Module:
    runtime, precision, _ = CANDIDATES[name]
    if runtime == "pytorch":
        from lowformer.deploy import deploy
        return deploy(model, x, precision=precision, min_cosine=-1.0 if precision != "fp32" else None)
    if runtime == "openvino":
        from lowformer.deploy.openvino import deploy_openvino
        return deploy_openvino(model, x[:1], precision, batches or None, threads, deploy_graph=True, min_cosine=-1.0)
    from lowformer.deploy.onnx import OrtModule, deploy_int8, export_onnx, portable_deploy
    if precision == "int8":
        return deploy_int8(model, x[:1], batches, threads=threads, min_cosine=-1.0)
    import tempfile
    from pathlib import Path
    path = Path(tempfile.mkdtemp(prefix="lowformer-auto-")) / "deploy.onnx"
    export_onnx(portable_deploy(model, x[:1]), path, x[:1], reference=model)
    return OrtModule(path, threads)


def _time(fns: dict[str, Callable[[], Any]], threads: int, rounds: int, min_run_time: float) -> dict[str, list[float]]:
    from lowformer.bench.timing import measure
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(measure(fn, threads=threads, warmup=2, min_run_time=min_run_time, min_samples=3).median)
    return times


def deploy_auto(model: nn.Module, example_input: torch.Tensor,
                calibration: Iterable[torch.Tensor] | torch.Tensor | None = None, min_cosine: float = 0.99,
                threads: int | None = None, candidates: Iterable[str] | None = None, rounds: int = 3,
                min_run_time: float = 0.2) -> nn.Module:
    """The fastest candidate (see the module docstring) on ``example_input`` whose cosine to ``model`` reaches
    ``min_cosine`` on the check images; its ``report`` says which, why, and what every other candidate measured.

    ``threads``: the thread count to time and run with (default: PyTorch's current one); ``candidates``: a subset
    of :data:`CANDIDATES` to try (default: :func:`candidate_names`)."""
    from lowformer.deploy.calibration import calibration_batches
    batches = calibration_batches(calibration) if calibration is not None else []
    names = list(candidates) if candidates is not None else candidate_names(bool(batches))
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown or not names:
        raise LowformerError(f"unknown deploy candidate(s) {unknown or names}: choose from {', '.join(CANDIDATES)}")
    if any(CANDIDATES[n][1] == "int8" for n in names) and not batches:
        raise LowformerError("int8 candidates need calibration images: pass calibration= a tensor of preprocessed "
                             "images, or leave int8 out of candidates")
    threads = threads or torch.get_num_threads()
    check_images = list(torch.cat(batches)[:16].split(8)) if batches else [example_input]
    built: dict[str, nn.Module] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            with torch.inference_mode(False):
                module = _build(name, model, example_input, batches, threads)
            check = compare_outputs(model, module, check_images)
            built[name] = module
            results[name] = {"runtime": CANDIDATES[name][0], "precision": CANDIDATES[name][1],
                             "cosine": check["min_cosine"], "rel_diff": check["rel_diff"],
                             "meets_gate": check["min_cosine"] >= min_cosine}
        except Exception as e:  # noqa: BLE001 - a candidate that cannot be built is reported, not fatal
            _logger.warning("deploy candidate %s failed: %s", name, e)
            results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:200], "meets_gate": False}

    def runner(module: nn.Module) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return module(example_input)
        return run
    times = _time({n: runner(m) for n, m in built.items()}, threads, rounds, min_run_time)
    for name, t in times.items():
        results[name].update(median_ms=sorted(t)[len(t) // 2] * 1e3, min_ms=min(t) * 1e3)
    passing = [n for n in built if results[n]["meets_gate"]]
    if not passing:
        raise LowformerError(f"no deploy candidate reaches cosine {min_cosine} to the eager model: "
                             + ", ".join(f"{n} {r.get('cosine', r.get('error'))}" for n, r in results.items()))
    best = min(passing, key=lambda n: results[n]["median_ms"])
    fastest = min(built, key=lambda n: results[n]["median_ms"])
    why = (f"{best}: fastest of the candidates that reach cosine >= {min_cosine} "
           f"({results[best]['median_ms']:.2f} ms median on input {tuple(example_input.shape)}, {threads} thread(s))")
    if fastest != best:
        why += f"; {fastest} was faster but its cosine {results[fastest]['cosine']:.4f} misses the gate"
    module = built[best]
    report = {"runtime": results[best]["runtime"], "precision": results[best]["precision"], "candidate": best,
              "why": why, "candidates": results, "cpu": cpu_features().as_dict(), "threads": threads,
              "min_cosine": min_cosine, "check_images": sum(len(b) for b in check_images),
              "chosen_report": getattr(module, "report", {})}
    module.report = report
    return module
