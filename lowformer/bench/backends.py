"""Backends behind one interface: a prepared model is a callable on a fixed input, checked against eager.

``eager`` and ``channels_last`` run the module; ``torchscript`` traces it, freezes it and applies
``optimize_for_inference`` (the original's ``--optit``: conv-BN folding and friends); ``compile`` is
``torch.compile``; ``onnxruntime`` exports to ONNX once per (model, weights, input size, opset), checks
the runtime's outputs against PyTorch and times the session. Every backend's output is compared with the
eager model's on the same input before it is timed, and the largest difference is reported.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lowformer.errors import LowformerError

__all__ = ["BACKENDS", "DEPLOY_BACKENDS", "AMP_DTYPES", "Prepared", "OutputMismatchError", "check_amp", "export_onnx", "prepare",
           "onnx_cache_dir"]

_logger = logging.getLogger(__name__)

# The deploy backends (``lowformer.deploy``): the rewritten PyTorch graph in fp32 or bf16, ONNX Runtime on its
# export, and ONNX Runtime int8. Listed here by name so the command line can offer them without importing onnx.
DEPLOY_BACKENDS = ("deploy", "deploy-bf16", "onnxruntime-deploy", "onnxruntime-int8")
BACKENDS = ("eager", "channels_last", "torchscript", "compile", "onnxruntime") + DEPLOY_BACKENDS
_LOSSY_BACKENDS = ("deploy-bf16", "onnxruntime-int8")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class OutputMismatchError(LowformerError):
    """A backend's outputs differ from the eager model's beyond the tolerance."""


@dataclass
class Prepared:
    """A backend ready to time: ``run()`` does one forward pass on the prepared input."""
    backend: str
    run: Callable[[], Any]
    max_abs_diff: float
    info: dict[str, Any] = field(default_factory=dict)


def onnx_cache_dir() -> Path:
    """Where exported ONNX files are kept: ``$LOWFORMER_CACHE/onnx`` or ``~/.cache/lowformer/onnx``."""
    root = os.environ.get("LOWFORMER_CACHE") or Path.home() / ".cache" / "lowformer"
    return Path(root) / "onnx"


def _autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def check_amp(device: torch.device, amp: str | None, backend: str) -> None:
    """Refuse AMP settings the device or backend cannot honour, instead of timing fp32 under an AMP label."""
    if amp is None:
        return
    if amp not in AMP_DTYPES:
        raise LowformerError(f"unknown --amp '{amp}': use one of {', '.join(AMP_DTYPES)}")
    if backend == "onnxruntime" or backend in DEPLOY_BACKENDS:
        raise LowformerError(f"--amp applies to the eager, channels_last, torchscript and compile backends; "
                             f"{backend} sets its own precision (use deploy-bf16 or onnxruntime-int8)")
    if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise LowformerError(f"{torch.cuda.get_device_name(device)} does not support bf16; use --amp fp16")


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


def _compare(reference: torch.Tensor, output: torch.Tensor, backend: str, rtol: float) -> float:
    reference, output = reference.detach().float().cpu(), torch.as_tensor(output).detach().float().cpu()
    if reference.shape != output.shape:
        raise OutputMismatchError(f"{backend} output shape {tuple(output.shape)} differs from PyTorch's "
                                  f"{tuple(reference.shape)}")
    diff = (reference - output).abs().max().item()
    scale = reference.abs().max().item()
    if not diff <= rtol * max(scale, 1.0):
        raise OutputMismatchError(f"{backend} outputs differ from PyTorch's by up to {diff:.3g} (outputs up to "
                                  f"{scale:.3g}, allowed {rtol:g} relative): the export changed the model; "
                                  "time this model with another backend")
    return diff


def prepare(model: nn.Module, backend: str, x: torch.Tensor, amp: str | None = None, opset: int = 17,
            threads: int = 1, cache_key: str | None = None, cache_dir: Path | None = None) -> Prepared:
    """Turn ``model`` (eval mode, on ``x``'s device) into a timed callable for ``backend``.

    Args:
        threads: intra-op threads of the onnxruntime session (PyTorch's are set around each measurement).
        cache_key: names the model in the ONNX cache file (the weights' digest is added, so a file exported
            from other weights is never reused).
    """
    if backend not in BACKENDS:
        raise LowformerError(f"unknown backend '{backend}': use one of {', '.join(BACKENDS)}")
    device = x.device
    check_amp(device, amp, backend)
    rtol = 1e-3 if amp is None else 5e-2
    with torch.inference_mode(), _autocast(device, amp):
        reference = _first_tensor(model(x))

    if backend == "onnxruntime":
        return _prepare_onnx(model, x, reference, opset, cache_key or type(model).__name__,
                             cache_dir or onnx_cache_dir(), rtol, threads)
    if backend in DEPLOY_BACKENDS:
        return _prepare_deploy(model, backend, x, reference, rtol, threads)

    if backend == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    elif backend == "torchscript":
        with torch.no_grad(), _autocast(device, amp), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated, still the original's --optit
            traced = torch.jit.trace(model, x, check_trace=False)
            model = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    elif backend == "compile":
        model = torch.compile(model)

    def run() -> Any:
        with torch.inference_mode(), _autocast(device, amp):
            return model(x)

    return Prepared(backend, run, _compare(reference, _first_tensor(run()), backend, rtol))


def _prepare_deploy(model: nn.Module, backend: str, x: torch.Tensor, reference: torch.Tensor, rtol: float,
                    threads: int) -> Prepared:
    """A ``lowformer.deploy`` backend. int8 is calibrated on the timed input itself: speed does not depend on
    the calibration data (accuracy is measured by ``benchmarks/deploy_cpu.py --accuracy``). Lossy backends
    report their max difference instead of failing the exact check; deploy checks them by cosine."""
    from lowformer.deploy.backends import deploy_runner
    run, report = deploy_runner(model, backend, x, threads=threads,
                                calibration=x if backend == "onnxruntime-int8" else None)
    output = _first_tensor(run()).float()
    if backend in _LOSSY_BACKENDS:
        diff = (output - reference.float()).abs().max().item()
    else:
        diff = _compare(reference, output, backend, rtol)
    return Prepared(backend, run, diff, {"deploy_passes": " ".join(report.get("passes", []))})


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    """Export with a dynamic batch axis (input ``input``, output ``output``), as the original does, to a temporary
    name renamed into place, so a cached file is always complete."""
    from lowformer.deploy.onnx import write_onnx
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_onnx(model.cpu(), x.cpu(), tmp, opset)
    tmp.replace(path)


def _prepare_onnx(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, opset: int, key: str,
                  cache_dir: Path, rtol: float, threads: int) -> Prepared:
    import numpy as np
    import onnxruntime as ort
    device = x.device
    size = "x".join(str(s) for s in x.shape[2:])
    path = cache_dir / f"{key}_{size}_opset{opset}_{_weights_digest(model)}.onnx"
    if not path.exists():
        _logger.info("exporting %s to %s", key, path)
        export_onnx(model, x, path, opset)
        model.to(device)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LowformerError("onnxruntime has no CUDA provider here; install onnxruntime-gpu or use --device cpu")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device.type == "cuda":
        binding = session.io_binding()
        binding.bind_input("input", "cuda", device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output("output", "cuda", device.index or 0)

        def run() -> Any:
            session.run_with_iobinding(binding)
            return binding.get_outputs()[0]
        output = run().numpy()
    else:
        feed = {"input": x.detach().cpu().numpy()}

        def run() -> Any:
            return session.run(None, feed)[0]
        output = run()
    diff = _compare(reference, torch.from_numpy(output), "onnxruntime", rtol)
    return Prepared("onnxruntime", run, diff, {"onnx_file": str(path), "opset": opset})
