"""The deploy backends as callables on a fixed input, for ``lowformer bench --backend deploy`` and the
benchmark script: ``deploy`` (PyTorch, fp32), ``deploy-bf16``, ``onnxruntime-deploy`` (ONNX Runtime on the
exported deploy graph) and ``onnxruntime-int8`` (statically quantized export)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from lowformer.deploy import deploy
from lowformer.errors import LowformerError

__all__ = ["DEPLOY_BACKENDS", "deploy_runner"]

DEPLOY_BACKENDS = ("deploy", "deploy-bf16", "onnxruntime-deploy", "onnxruntime-int8")


def deploy_runner(model: nn.Module, backend: str, x: torch.Tensor, threads: int = 1,
                  calibration: Iterable[torch.Tensor] | torch.Tensor | None = None,
                  workdir: str | Path | None = None) -> tuple[Callable[[], torch.Tensor], dict[str, Any]]:
    """``(run, info)``: ``run()`` does one inference on ``x`` with ``backend``; ``info`` is the deploy report
    (passes applied, output check). The result was already checked against ``model`` on ``x``'s shape.

    ONNX files go to ``workdir`` (default: a fresh temporary directory); ``threads`` sets ONNX Runtime's
    intra-op threads (PyTorch's are the caller's, e.g. torch.utils.benchmark's ``num_threads``). Lossy backends
    accept any cosine (timing does not depend on it) and record it in ``info['check']``."""
    from lowformer.deploy.onnx import OrtModule, deploy_int8, export_onnx, portable_deploy
    if backend not in DEPLOY_BACKENDS:
        raise LowformerError(f"unknown deploy backend '{backend}': use one of {', '.join(DEPLOY_BACKENDS)}")
    example = x[:1]
    if backend in ("deploy", "deploy-bf16"):  # weights pre-packed for, and checked at, the timed shape
        bf16 = backend == "deploy-bf16"
        module = deploy(model, x, precision="bf16" if bf16 else "fp32", min_cosine=-1.0 if bf16 else None)
        info = module.report
    else:
        workdir = Path(workdir or tempfile.mkdtemp(prefix="lowformer-deploy-"))
        workdir.mkdir(parents=True, exist_ok=True)
        if backend == "onnxruntime-int8":
            module = deploy_int8(model, example, calibration, threads=threads, out_path=workdir / "int8.onnx",
                                 min_cosine=-1.0)
            module.report["onnx_file"] = module.path
        else:
            path = workdir / "deploy.onnx"
            report = export_onnx(portable_deploy(model, example), path, example, reference=model)
            module = OrtModule(path, threads)
            module.report = {"check": report, "onnx_file": str(path)}
        info = module.report

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return module(x)
    return run, info
