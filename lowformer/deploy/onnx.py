"""ONNX export checked against PyTorch, ONNX Runtime sessions, and int8 static quantization.

An exported file is only written once ONNX Runtime's outputs match the PyTorch model's on the check inputs
(``DeployMismatchError`` otherwise, and the file is removed). int8 uses ONNX Runtime's static quantization
(QDQ, per-channel weights, MinMax calibration on real images); an empty calibration set is refused.
On a CPU without VNNI (``lowformer.deploy.cpu``) weights are quantized to 7 bits (``reduce_range``): ONNX
Runtime's AVX2 u8 x s8 kernels add pairs of products in saturating 16-bit lanes (``vpmaddubsw``), which 255 x 127 x 2 overflows; with full
8-bit weights a random-weight LowFormer-B0's int8 logits reach only 0.90 cosine to fp32 on real images, with
7-bit weights 0.999 (``benchmarks/deploy_cpu.py --accuracy``).
onnx and onnxruntime are optional dependencies (the ``onnx`` extra), imported where used.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from lowformer.deploy.check import DEFAULT_RTOL, DeployMismatchError, verify_outputs
from lowformer.deploy.cpu import cpu_has_vnni
from lowformer.deploy.fold import fold_input_size
from lowformer.errors import LowformerError

__all__ = ["OPSET", "write_onnx", "export_onnx", "ort_session", "OrtModule", "quantize_int8", "calibration_batches",
           "deploy_int8", "portable_deploy", "cpu_has_vnni"]

_logger = logging.getLogger(__name__)

OPSET = 18
# int8 is checked by cosine to fp32 rather than max |diff|: quantization error is the point. With 7-bit weights
# on non-VNNI CPUs, random-weight LowFormers B0-B3 and E1 reach 0.997-0.9997 on real images (0.73-0.98 with
# saturating 8-bit weights), so the default gate is the accuracy target. Some random-weight featured
# models stay below it (timm's mobilenetv3_large_100 and fastvit_t8 at 0.68, visformer_tiny and ffnet_1 at 0.97):
# pass a lower min_cosine to accept them.
INT8_MIN_COSINE = 0.99


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LowformerError("ONNX export and int8 need onnx and onnxruntime: pip install 'lowformer[onnx]'") from None
    return onnxruntime


def ort_session(path: str | os.PathLike, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads."""
    ort = _import_ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the ``module(tensor) -> tensor`` interface of the other backends."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        super().__init__()
        self.path = str(path)
        self.session = ort_session(path, threads)
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def portable_deploy(model: nn.Module, example_input: torch.Tensor, passes: Iterable[str] | None = None) -> nn.Module:
    """``deploy`` restricted to the passes that keep a graph exportable (no oneDNN kernels), in fp32 NCHW."""
    from lowformer.deploy import PORTABLE_PASSES, deploy
    names = list(PORTABLE_PASSES) if passes is None else [n for n in passes if n in PORTABLE_PASSES]
    deployed = deploy(model, example_input, passes=names)
    return deployed.module


@contextlib.contextmanager
def _held_output() -> Iterator[list[str]]:
    """Hold what is written to file descriptors 1 and 2 (the exporter's C++ log too) during the block; the text is
    in the yielded list afterwards. A failed export otherwise prints its whole TorchScript graph before raising."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved, text = [os.dup(1), os.dup(2)], []
    with tempfile.TemporaryFile(mode="w+") as held:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy_ in zip((1, 2), saved):
                os.dup2(copy_, fd)
                os.close(copy_)
            held.seek(0)
            text.append(held.read())


def write_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, opset: int = OPSET) -> None:
    """Export ``model`` to ``path`` with a dynamic batch axis (input ``input``, output ``output``), unchecked.
    Weights a model resizes from the input shape (EdgeFormer) are first folded for ``example_input``'s size.

    A model the exporter cannot express raises one LowformerError naming its reason, and leaves no file."""
    path = Path(path)
    model = fold_input_size(model, example_input)
    try:
        with torch.inference_mode(False), torch.no_grad(), _held_output() as held:
            torch.onnx.export(model, (example_input,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        sys.stderr.write("".join(held))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types, each after dumping its whole graph
        path.unlink(missing_ok=True)
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise LowformerError(f"{type(model).__name__} cannot be exported to ONNX (opset {opset}): {reason[:300]}; "
                             "run it in PyTorch (lowformer.deploy(model) or the eager model) instead") from None


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                check_inputs: list[torch.Tensor] | None = None, reference: nn.Module | None = None,
                rtol: float | None = DEFAULT_RTOL, min_cosine: float | None = None,
                opset: int = OPSET) -> dict[str, float]:
    """:func:`write_onnx`, then check ONNX Runtime against ``reference`` (default: ``model``) on ``check_inputs``
    (default: ``example_input`` and a batch of two).

    Returns the check result; raises DeployMismatchError, removing the file, when outputs diverge."""
    _import_ort()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_onnx(model, example_input, path, opset)
    if check_inputs is None:
        check_inputs = [example_input, torch.randn(2, *example_input.shape[1:])]
    return check_onnx(path, reference or model, check_inputs, rtol=rtol, min_cosine=min_cosine)


def check_onnx(path: str | os.PathLike, reference: nn.Module, inputs: list[torch.Tensor],
               rtol: float | None = DEFAULT_RTOL, min_cosine: float | None = None) -> dict[str, float]:
    """Compare an ONNX file run by ONNX Runtime with ``reference``; remove the file and raise on divergence."""
    try:
        return verify_outputs(reference, OrtModule(path), inputs, f"ONNX file {path}", rtol=rtol,
                              min_cosine=min_cosine)
    except DeployMismatchError:
        Path(path).unlink(missing_ok=True)
        raise


def calibration_batches(calibration: Iterable[torch.Tensor] | torch.Tensor | None) -> list[torch.Tensor]:
    """Calibration images as a list of N x C x H x W batches; refuses an empty or missing set."""
    if calibration is None:
        batches: list[torch.Tensor] = []
    elif isinstance(calibration, torch.Tensor):
        batches = [calibration] if calibration.numel() else []
    else:
        batches = [b if b.dim() == 4 else b.unsqueeze(0) for b in calibration if b.numel()]
    if not batches:
        raise LowformerError("int8 quantization needs calibration images: pass calibration= a tensor or batches "
                             "of preprocessed images (a few hundred real images from the target data)")
    return batches


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, input_name: str, batches: list[torch.Tensor]) -> None:
        self.input_name = input_name
        self._it: Iterator[torch.Tensor] = iter(batches)

    def get_next(self) -> dict[str, Any] | None:
        batch = next(self._it, None)
        return None if batch is None else {self.input_name: batch.float().contiguous().numpy()}


def quantize_int8(fp32_path: str | os.PathLike, out_path: str | os.PathLike,
                  calibration: Iterable[torch.Tensor] | torch.Tensor, reduce_range: bool | None = None) -> Path:
    """Static int8 quantization of an ONNX file: QDQ format, per-channel int8 weights, uint8 activations
    (what the AVX2 / VNNI kernels of ONNX Runtime run), MinMax ranges from ``calibration``.

    ``reduce_range`` quantizes weights to 7 bits; default: on CPUs without VNNI, whose kernels would otherwise
    saturate (module docstring)."""
    _import_ort()
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    batches = calibration_batches(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), _Reader("input", batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm"],
                        reduce_range=reduce_range)
    return Path(out_path)


def deploy_int8(model: nn.Module, example_input: torch.Tensor,
                calibration: Iterable[torch.Tensor] | torch.Tensor | None,
                passes: Iterable[str] | None = None, verify: bool = True, threads: int = 1,
                out_path: str | os.PathLike | None = None, min_cosine: float | None = INT8_MIN_COSINE,
                reduce_range: bool | None = None) -> OrtModule:
    """The portable deploy graph, exported, checked, quantized to int8 with ``calibration`` (``reduce_range``: see
    :func:`quantize_int8`) and checked by cosine (>= ``min_cosine``) on the calibration images; returns an
    :class:`OrtModule` (its ``report`` records the checks)."""
    batches = calibration_batches(calibration)
    graph = portable_deploy(model, example_input, passes)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        report: dict[str, Any] = {"precision": "int8", "fp32_check": export_onnx(graph, fp32, example_input,
                                                                                reference=model)}
        out = Path(out_path) if out_path is not None else Path(tempfile.mkdtemp(prefix="lowformer-int8-")) / "model.onnx"
        quantize_int8(fp32, out, batches, reduce_range=reduce_range)
    module = OrtModule(out, threads)
    if verify:
        report["check"] = verify_outputs(model, module, batches[:4], f"int8 ONNX file {out}", rtol=None,
                                         min_cosine=min_cosine)
    module.report = report
    return module
