"""ONNX export checked against PyTorch, ONNX Runtime sessions, and int8 static quantization.

An exported file replaces its target only once ONNX Runtime's outputs match the PyTorch model's on the check
inputs: it is written to a temporary name in the target folder, checked, then renamed over the target, so a
failure (``OutputMismatchError``, an exporter error, a full disk) leaves whatever was there untouched. int8 uses
ONNX Runtime's static quantization (QDQ, per-channel weights, MinMax calibration on real images); its
intermediates (the fp32 export, the pre-processed graph) live in a private temporary directory that is always
removed. An empty calibration set is refused.
On a CPU without VNNI (``lowformer.deploy.cpu``), weights are quantized to 7 bits (``reduce_range``): ONNX
Runtime's AVX2 u8 x s8 kernels add pairs of products in saturating 16-bit lanes (``vpmaddubsw``), which
255 x 127 x 2 overflows; with full 8-bit weights a random-weight LowFormer-B0's int8 logits reach only 0.90 cosine to fp32 on real
images, with 7-bit weights 0.999 (``benchmarks/deploy_cpu.py --accuracy``).
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

from lowformer.deploy.calibration import CHECK_BATCHES, calibration_batches
from lowformer.deploy.check import DEFAULT_RTOL, verify_outputs
from lowformer.deploy.cpu import cpu_has_vnni
from lowformer.deploy.fold import fold_input_size, needs_input_size_folding
from lowformer.errors import LowformerError, import_optional
from lowformer.files import atomic_output

__all__ = ["OPSET", "MIN_OPSET", "MAX_OPSET", "check_opset", "write_onnx", "export_onnx", "check_onnx", "check_dynamic_size",
           "ort_session", "OrtModule", "quantize_int8", "quantize_checked", "calibration_batches", "deploy_int8",
           "portable_deploy", "cpu_has_vnni"]

_logger = logging.getLogger(__name__)

# The one default opset of every export (``lowformer export``, bench's ONNX backends, deploy int8).
OPSET = 18
# what torch's TorchScript-based exporter writes
MIN_OPSET, MAX_OPSET = 7, 20
# int8 is checked by cosine to fp32 rather than max |diff|: quantization error is the point. With 7-bit weights
# on non-VNNI CPUs, random-weight LowFormers B0-B3 and E1 reach 0.997-0.9997 on real images (0.73-0.98 with
# saturating 8-bit weights), so the default gate is the accuracy target. Some random-weight featured
# models stay below it (timm's mobilenetv3_large_100 and fastvit_t8 at 0.68, visformer_tiny and ffnet_1 at 0.97):
# pass a lower min_cosine to accept them.
INT8_MIN_COSINE = 0.99


def check_opset(opset: int) -> int:
    """``opset`` if the exporter can write it, else one LowformerError naming the range."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise LowformerError(f"ONNX opset {opset!r} is not one the exporter writes: use {MIN_OPSET} to {MAX_OPSET} "
                             f"(default {OPSET})")
    return opset


def _import_ort() -> Any:
    return import_optional("onnxruntime", "onnx", "ONNX export")


def ort_session(model: str | os.PathLike | bytes, threads: int = 1, device: torch.device | str = "cpu",
                profile_prefix: str | None = None) -> Any:
    """The one ONNX Runtime session factory: all graph optimisations, ``threads`` intra-op threads, one
    inter-op thread; the CUDA provider first for a CUDA ``device``. ``model`` is a file or the file's bytes
    (the session holds the graph, so the file may be removed once it exists). ``profile_prefix`` turns on
    ONNX Runtime's node profiler, whose JSON ``session.end_profiling()`` writes under that prefix."""
    ort = _import_ort()
    device = torch.device(device)
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise LowformerError("onnxruntime has no CUDA provider here; install onnxruntime-gpu or use --device cpu")
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=providers)


class OrtModule(nn.Module):
    """An ONNX Runtime session behind the ``module(tensor) -> tensor`` interface of the other backends.

    ``path`` is the file it was loaded from (None when built from bytes)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int = 1) -> None:
        super().__init__()
        self.path = None if isinstance(model, bytes) else str(model)
        self.session = ort_session(model, threads)
        self.input_name = self.session.get_inputs()[0].name

    @property
    def threads(self) -> int:
        """The intra-op threads the session was created with."""
        return self.session.get_session_options().intra_op_num_threads

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The output tensor, or a tuple of them for a graph with several outputs (a detector's)."""
        outs = self.session.run(None, {self.input_name: x.detach().cpu().float().contiguous().numpy()})
        return torch.from_numpy(outs[0]) if len(outs) == 1 else tuple(torch.from_numpy(o) for o in outs)


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


def write_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, opset: int = OPSET,
               dynamic_size: bool = False) -> None:
    """Export ``model`` to ``path`` (a fresh temporary file: callers publish it once checked) with a dynamic batch
    axis (input ``input``, output ``output``), unchecked; ``dynamic_size`` makes the input's height and width
    dynamic too. A model with several outputs names them and their
    dynamic axes itself (``output_names``, ``dynamic_axes`` attributes, e.g.
    :class:`lowformer.detection.DetectorExport`). A model the exporter cannot express raises one
    LowformerError naming its reason. Weights a model resizes from the input shape
    (EdgeFormer) are first folded for ``example_input``'s size, so such a model has no dynamic-size export."""
    check_opset(opset)
    output_names = list(getattr(model, "output_names", ("output",)))
    dynamic_axes = getattr(model, "dynamic_axes", {"input": {0: "batch"}, "output": {0: "batch"}})
    if dynamic_size:
        check_dynamic_size(model)
        dynamic_axes = {**dynamic_axes, "input": {0: "batch", 2: "height", 3: "width"}}
    model = fold_input_size(model, example_input)
    try:
        with torch.inference_mode(False), torch.no_grad(), _held_output() as held:
            torch.onnx.export(model, (example_input,), str(path), input_names=["input"], output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False)
        sys.stderr.write("".join(held))
    except Exception as e:  # noqa: BLE001 - the exporter raises many types, each after dumping its whole graph
        lines = str(e).strip().splitlines()
        reason = lines[0] if lines else type(e).__name__
        raise LowformerError(f"{type(model).__name__} cannot be exported to ONNX (opset {opset}): {reason[:300]}; "
                             "run it in PyTorch (lowformer.deploy(model) or the eager model) instead") from None


def check_dynamic_size(model: nn.Module) -> None:
    """Refuse, in one line, a dynamic-size export of a model whose weights are resized from the input shape."""
    if needs_input_size_folding(model):
        raise LowformerError(f"{type(model).__name__} resizes its kernels to the input size, so it has no "
                             "dynamic-size graph: export it at a fixed --image-size instead")


def export_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor,
                check_inputs: list[torch.Tensor] | None = None, reference: nn.Module | None = None,
                rtol: float | None = DEFAULT_RTOL, min_cosine: float | None = None,
                opset: int = OPSET, dynamic_size: bool = False) -> dict[str, float]:
    """The one ONNX export: :func:`write_onnx` to a temporary name beside ``path``, check ONNX Runtime against
    ``reference`` (default: ``model``) on ``check_inputs`` (default: ``example_input`` and a batch of two; with
    ``dynamic_size`` also a batch of two 32 x 64 pixels larger), then rename over ``path``.

    Returns the check result. On any failure (OutputMismatchError when outputs diverge, an exporter error)
    ``path`` keeps what it held before and no temporary file is left."""
    _import_ort()
    check_opset(opset)
    param = next(model.parameters(), None)
    traced_input = example_input.to(param.device) if param is not None else example_input
    if check_inputs is None:
        check_inputs = [example_input.cpu(), torch.randn(2, *example_input.shape[1:])]
    check_inputs = [x.cpu() for x in check_inputs]
    what = f"ONNX export of {type(model).__name__} (opset {opset})"
    with atomic_output(path) as tmp, warnings_held():
        write_onnx(model, traced_input, tmp, opset, dynamic_size)
        result = check_onnx(tmp, reference or model, check_inputs, rtol=rtol, min_cosine=min_cosine, what=what)
        if dynamic_size:
            _check_other_size(tmp, reference or model, example_input, rtol, min_cosine, what)
        return result


def _check_other_size(path: Path, reference: nn.Module, example_input: torch.Tensor, rtol: float | None,
                      min_cosine: float | None, what: str) -> None:
    """A dynamic-size export must also match at a size it was not traced at; a model whose graph the tracer tied
    to the traced size (shapes turned into constants) fails in one line here."""
    n, c, h, w = example_input.shape
    other = torch.randn(2, c, h + 32, w + 64)
    try:
        with _held_output():  # ONNX Runtime logs its shape error to stderr before raising it
            check_onnx(path, reference, [other], rtol=rtol, min_cosine=min_cosine, what=f"{what} at {h + 32}x{w + 64}")
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's shape errors and divergence alike mean "no dynamic size"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowformerError(f"{type(reference).__name__} has no dynamic-size ONNX graph (traced at {h}x{w}, it fails "
                             f"at {h + 32}x{w + 64}: {reason[:200]}); export it without --dynamic-size") from None


@contextlib.contextmanager
def warnings_held() -> Iterator[None]:
    """The exporter's tracer warnings (shape-dependent Python branches that the check then covers) left out."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def check_onnx(path: str | os.PathLike, reference: nn.Module, inputs: list[torch.Tensor],
               rtol: float | None = DEFAULT_RTOL, min_cosine: float | None = None,
               what: str | None = None) -> dict[str, float]:
    """Compare an ONNX file run by ONNX Runtime with ``reference``; OutputMismatchError on divergence (the file
    itself is left as it is). A graph with several outputs (a detector's boxes, scores, labels) is checked
    output by output, each against its own scale, and the result adds ``outputs`` (each one's check) and
    ``rows`` (the first output's length on each input: a detector's detection counts)."""
    module, what = OrtModule(path), what or f"ONNX file {path}"
    hint = "export the model without --deploy, or run it in PyTorch"
    names = module.output_names
    if len(names) == 1:
        return verify_outputs(reference, module, inputs, what, rtol=rtol, min_cosine=min_cosine, hint=hint)
    # Untrained detectors score many boxes nearly alike, and rounding then reorders them.
    hint = "untrained weights score boxes nearly alike, which rounding reorders: export trained weights"
    inputs = list(inputs)
    with torch.inference_mode():
        param = next(reference.parameters(), None)
        refs = [reference(x.to(param.device) if param is not None else x) for x in inputs]
        refs = [tuple(t.detach().cpu() for t in r) for r in refs]
        outs = [module(x) for x in inputs]

    def pick(results: list, i: int) -> Any:
        return lambda x: results[next(j for j, y in enumerate(inputs) if y is x)][i]

    per = {name: verify_outputs(pick(refs, i), pick(outs, i), inputs, f"{what}, output '{name}'", rtol=rtol,
                                min_cosine=min_cosine, hint=hint) for i, name in enumerate(names)}
    worst = {"max_abs_diff": max(r["max_abs_diff"] for r in per.values()),
             "max_abs_ref": max(r["max_abs_ref"] for r in per.values()),
             "rel_diff": max(r["rel_diff"] for r in per.values()),
             "min_cosine": min(r["min_cosine"] for r in per.values())}
    return {**worst, "outputs": per, "rows": [len(r[0]) for r in refs]}


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
    (what the AVX2 / VNNI kernels of ONNX Runtime run), MinMax ranges from ``calibration``; ``out_path`` is
    replaced only when quantization succeeded.

    ``reduce_range`` quantizes weights to 7 bits; default: on CPUs without VNNI, whose kernels would otherwise
    saturate (module docstring)."""
    _import_ort()
    if reduce_range is None:
        reduce_range = not cpu_has_vnni()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    batches = calibration_batches(calibration)
    with tempfile.TemporaryDirectory(prefix="lowformer-int8-") as tmp, atomic_output(out_path) as out:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Reader("input", batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv", "Gemm"],
                        reduce_range=reduce_range)
    return Path(out_path)


def quantize_checked(graph: nn.Module, reference: nn.Module, example_input: torch.Tensor,
                     calibration: Iterable[torch.Tensor] | torch.Tensor | None, out_path: str | os.PathLike | None = None,
                     verify: bool = True, min_cosine: float | None = INT8_MIN_COSINE, reduce_range: bool | None = None,
                     opset: int = OPSET, threads: int = 1) -> OrtModule:
    """The one int8 pipeline (``lowformer export --precision int8`` and ``deploy(precision="int8")``): export
    ``graph`` (checked against ``reference``), quantize it with ``calibration``, check the int8 outputs by cosine
    (>= ``min_cosine``) on the first ``CHECK_BATCHES`` calibration batches, and return an :class:`OrtModule`
    (``report`` records the checks).

    Intermediates live in a private temporary directory that is always removed; the int8 file is published to
    ``out_path`` (when given) only after its check passed, replacing what was there."""
    batches = calibration_batches(calibration)
    report: dict[str, Any] = {"precision": "int8"}
    with tempfile.TemporaryDirectory(prefix="lowformer-int8-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        report["fp32_check"] = export_onnx(graph, fp32, example_input, reference=reference, opset=opset)
        quantize_int8(fp32, int8, batches, reduce_range=reduce_range)
        data = int8.read_bytes()
    module = OrtModule(data, threads)
    if verify:
        report["check"] = verify_outputs(reference, module, batches[:CHECK_BATCHES], "int8 ONNX model", rtol=None,
                                         min_cosine=min_cosine)
    if out_path is not None:
        with atomic_output(out_path) as tmp_out:
            tmp_out.write_bytes(data)
        module.path = str(out_path)
    module.report = report
    return module


def deploy_int8(model: nn.Module, example_input: torch.Tensor,
                calibration: Iterable[torch.Tensor] | torch.Tensor | None,
                passes: Iterable[str] | None = None, verify: bool = True, threads: int = 1,
                out_path: str | os.PathLike | None = None, min_cosine: float | None = INT8_MIN_COSINE,
                reduce_range: bool | None = None, opset: int = OPSET) -> OrtModule:
    """The portable deploy graph through :func:`quantize_checked` (``reduce_range``: see :func:`quantize_int8`)."""
    calibration = calibration_batches(calibration)
    return quantize_checked(portable_deploy(model, example_input, passes), model, example_input, calibration,
                            out_path=out_path, verify=verify, min_cosine=min_cosine, reduce_range=reduce_range,
                            opset=opset, threads=threads)
