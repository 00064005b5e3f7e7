"""OpenVINO as a deploy runtime: fp32, bf16 (its inference-precision hint) and NNCF int8 on real images.

A model goes through the one checked ONNX export (:func:`lowformer.deploy.onnx.export_onnx`: input-size folding,
dynamic batch, ONNX Runtime's outputs compared with PyTorch's), optionally on the portable deploy graph, then
``openvino.convert_model``. int8 is NNCF post-training quantization calibrated on the caller's images, or NNCF's
accuracy-aware mode, which keeps layers in float until the mean cosine to the fp32 outputs on the check images
drops by at most ``1 - min_cosine``. The compiled model is checked like every other deployment: fp32 by
max |diff| <= 1e-4 x max |output|, bf16 and int8 by the per-sample cosine gate on the check images.

OpenVINO's CPU plugin defaults to bf16 on CPUs with native bf16, so fp32 is always requested explicitly.
openvino and nncf are optional dependencies (the ``openvino`` extra), imported where used.
"""
from __future__ import annotations

import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from lowformer.deploy.check import DEFAULT_RTOL, verify_outputs
from lowformer.errors import LowformerError, import_optional

__all__ = ["OV_PRECISIONS", "OvModule", "compile_openvino", "convert_openvino", "deploy_openvino",
           "openvino_backend", "quantize_openvino", "save_openvino", "write_openvino_format"]

_logger = logging.getLogger(__name__)

OV_PRECISIONS = ("fp32", "bf16", "int8")
_HINT = {"fp32": "f32", "bf16": "bf16"}


def _import_ov() -> Any:
    return import_optional("openvino", "openvino", "the OpenVINO runtime")


def _import_nncf() -> Any:
    return import_optional("nncf", "openvino", "OpenVINO int8")


def compile_openvino(ov_model: Any, threads: int = 1, inference_precision: str = "fp32") -> Any:
    """Compile for the CPU for latency: one stream, ``threads`` inference threads, and ``inference_precision``
    (``fp32`` or ``bf16``) for the layers that are not quantized."""
    ov = _import_ov()
    if inference_precision not in _HINT:
        raise LowformerError(f"unknown OpenVINO inference precision '{inference_precision}': use fp32 or bf16")
    config = {"INFERENCE_PRECISION_HINT": _HINT[inference_precision], "INFERENCE_NUM_THREADS": int(threads),
              "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    return ov.Core().compile_model(ov_model, "CPU", config)


class OvModule(nn.Module):
    """A compiled OpenVINO model behind the ``module(tensor) -> tensor`` interface of the other backends."""

    def __init__(self, compiled: Any, report: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.report = report or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: x.detach().cpu().float().contiguous().numpy()}, share_inputs=True)
        return torch.from_numpy(np.array(self.request.get_output_tensor(0).data, copy=True))


def convert_openvino(model: nn.Module, example_input: torch.Tensor, deploy_graph: bool = False,
                     workdir: str | os.PathLike | None = None,
                     onnx_file: str | os.PathLike | None = None) -> tuple[Any, dict[str, Any]]:
    """``(ov.Model, export check)``: ``model`` (or its portable deploy graph) through the checked ONNX export,
    converted by OpenVINO's ONNX frontend. The ONNX file lives in ``workdir`` (default: a temporary folder);
    ``onnx_file``: an export of the same graph already checked (a benchmark's cache) to convert instead."""
    ov = _import_ov()
    if onnx_file is not None:
        return ov.convert_model(str(onnx_file)), {}
    from lowformer.deploy.onnx import export_onnx, portable_deploy
    graph = portable_deploy(model, example_input[:1]) if deploy_graph else model
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "model.onnx"
        check = export_onnx(graph, path, example_input[:1], reference=model)
        ov_model = ov.convert_model(str(path))
    return ov_model, check


def _cosine_metric(compiled: Any, items: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[float, list[float]]:
    """NNCF validation function: mean (and per-image) cosine of the model's outputs to the fp32 reference."""
    request = compiled.create_infer_request()
    values = []
    for image, reference in items:
        out = np.asarray(request.infer({0: image})[compiled.output(0)], dtype=np.float64).reshape(-1)
        ref = reference.astype(np.float64).reshape(-1)
        values.append(float(out @ ref / max(np.linalg.norm(out) * np.linalg.norm(ref), 1e-12)))
    return float(np.mean(values)), values


def quantize_openvino(ov_model: Any, calibration: list[torch.Tensor], reference: nn.Module | None = None,
                      accuracy_control: bool = False, min_cosine: float = 0.99) -> Any:
    """NNCF int8 post-training quantization of ``ov_model`` calibrated on ``calibration`` (batches of images).

    ``accuracy_control`` runs NNCF's accuracy-aware mode with the mean cosine to ``reference``'s outputs on the
    same images as the metric and ``1 - min_cosine`` as the largest drop allowed."""
    nncf = _import_nncf()
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet
    images = [img.unsqueeze(0).float().numpy() for batch in calibration for img in batch]
    dataset = nncf.Dataset(images)
    # asymmetric activations (hardswish / GELU outputs are one-sided) and float transposed convs: on a random-weight
    # LowFormer-B0 and 16 imagenet-sample images, NNCF's defaults reach cosine 0.81 to fp32, mixed 0.93, both 0.98.
    # Activation ranges are the calibration set's min / max, as ONNX Runtime's: NNCF's default (means of per-image
    # extremes) clips images unlike the calibration ones, and on a trained CIFAR-10 LowFormer-B0 calibrated on its
    # training images it left 19 % of imagenet-sample images under cosine 0.99 (min 0.38); min / max left none (0.992)
    options = {"preset": nncf.QuantizationPreset.MIXED, "subset_size": len(images), "ignored_scope": nncf.IgnoredScope(
        types=["ConvolutionBackpropData", "GroupConvolutionBackpropData"], validate=False)}
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX)
    if not accuracy_control:
        return nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **options)
    if reference is None:
        raise LowformerError("accuracy-aware int8 needs the fp32 reference model")
    with torch.inference_mode():
        pairs = [(img, reference(torch.from_numpy(img)).float().numpy()) for img in images]
    return nncf.quantize_with_accuracy_control(
        ov_model, nncf.Dataset(pairs, lambda item: item[0]), nncf.Dataset(pairs), _cosine_metric,
        max_drop=max(1.0 - min_cosine, 0.0), drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
        **options)


def _prepare(model: nn.Module, example_input: torch.Tensor, precision: str,
             calibration: Iterable[torch.Tensor] | torch.Tensor | None, deploy_graph: bool, accuracy_control: bool,
             min_cosine: float | None, onnx_file: str | os.PathLike | None = None
             ) -> tuple[Any, list[torch.Tensor], dict[str, Any]]:
    if precision not in OV_PRECISIONS:
        raise LowformerError(f"unknown OpenVINO precision '{precision}': choose one of {', '.join(OV_PRECISIONS)}")
    if model.training:
        raise LowformerError("deploy() needs a model in eval mode: call model.eval() first")
    from lowformer.deploy.onnx import calibration_batches
    batches = calibration_batches(calibration) if precision == "int8" else []
    ov_model, export_check = convert_openvino(model, example_input, deploy_graph, onnx_file=onnx_file)
    report: dict[str, Any] = {"runtime": "openvino", "precision": precision, "graph": "deploy" if deploy_graph
                              else "plain", "export_check": export_check}
    if precision == "int8":
        ov_model = quantize_openvino(ov_model, batches, model, accuracy_control,
                                     0.99 if min_cosine is None or min_cosine < 0 else min_cosine)
        report.update(calibration_images=sum(len(b) for b in batches), accuracy_control=accuracy_control)
    return ov_model, batches, report


def deploy_openvino(model: nn.Module, example_input: torch.Tensor, precision: str = "fp32",
                    calibration: Iterable[torch.Tensor] | torch.Tensor | None = None, threads: int = 1,
                    deploy_graph: bool = True, accuracy_control: bool = False, verify: bool = True,
                    min_cosine: float | None = 0.99, check_images: torch.Tensor | None = None,
                    onnx_file: str | os.PathLike | None = None) -> OvModule:
    """``model`` compiled by OpenVINO for the CPU at ``precision``; checked against ``model``.

    Args:
        deploy_graph: export the portable deploy graph (BatchNorm, transposed-conv and GroupNorm-affine folded)
            rather than the eager model.
        calibration: int8 only: preprocessed real images (a tensor N x C x H x W or batches).
        accuracy_control: int8 only: NNCF's accuracy-aware quantization (see :func:`quantize_openvino`).
        min_cosine: bf16 / int8: the lowest per-sample cosine to ``model`` on the check images (default the
            calibration images, else ``example_input``); -1 accepts anything and records it.
        check_images: images to check lossy outputs on instead.
        onnx_file: see :func:`convert_openvino`.
    """
    ov_model, batches, report = _prepare(model, example_input, precision, calibration, deploy_graph,
                                         accuracy_control, min_cosine, onnx_file)
    # int8: the non-quantized layers stay fp32, so the figure is int8's and not int8 mixed with bf16
    compiled = compile_openvino(ov_model, threads, "bf16" if precision == "bf16" else "fp32")
    module = OvModule(compiled, report)
    if verify:
        what = f"OpenVINO {precision} ({type(model).__name__})"
        if precision == "fp32":
            inputs = [example_input, torch.randn(2, *example_input.shape[1:])]
            report["check"] = verify_outputs(model, module, inputs, what, rtol=DEFAULT_RTOL)
        else:
            images = check_images if check_images is not None else (torch.cat(batches)[:16] if batches
                                                                    else example_input)
            report["check"] = verify_outputs(model, module, list(images.split(8)), what, rtol=None,
                                             min_cosine=min_cosine)
    return module


def save_openvino(model: nn.Module, out: str | os.PathLike, example_input: torch.Tensor, precision: str = "fp32",
                  calibration: Iterable[torch.Tensor] | torch.Tensor | None = None, deploy_graph: bool = False,
                  accuracy_control: bool = False, min_cosine: float | None = 0.99,
                  name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Write ``model`` as OpenVINO IR (``.xml`` + ``.bin``) to ``out`` (a ``.xml`` path, or a folder that gets
    ``<name>.xml``), after checking the compiled IR against ``model`` as :func:`deploy_openvino` does.

    Both files are written under temporary names in the target folder and renamed into place (the ``.bin``
    first), so an existing IR is replaced only by a complete, checked one. Returns ``(xml path, report)``."""
    ov = _import_ov()
    out = Path(out)
    xml = out if out.suffix == ".xml" else out / f"{name or type(model).__name__}.xml"
    if xml.exists() and xml.is_dir():
        raise LowformerError(f"{xml} is a folder: pass a .xml file name or a folder for --out")
    ov_model, batches, report = _prepare(model, example_input, precision, calibration, deploy_graph,
                                         accuracy_control, min_cosine)
    xml.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{xml.stem}.{uuid.uuid4().hex[:8]}.tmp"
    tmp_xml, tmp_bin = xml.parent / f"{stem}.xml", xml.parent / f"{stem}.bin"
    try:
        # fp32 weights stay fp32 (save_model would halve them by default); bf16 is a run-time choice
        ov.save_model(ov_model, str(tmp_xml), compress_to_fp16=False)
        reloaded = OvModule(compile_openvino(ov.Core().read_model(str(tmp_xml)), 1,
                                             "bf16" if precision == "bf16" else "fp32"), report)
        what = f"OpenVINO IR {xml}"
        if precision == "fp32":
            report["check"] = verify_outputs(model, reloaded, [example_input[:1]], what, rtol=DEFAULT_RTOL)
        else:
            images = torch.cat(batches)[:16] if batches else example_input
            report["check"] = verify_outputs(model, reloaded, list(images.split(8)), what, rtol=None,
                                             min_cosine=min_cosine)
        del reloaded
        tmp_bin.replace(xml.with_suffix(".bin"))
        tmp_xml.replace(xml)
    finally:
        tmp_xml.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
    return xml, report


def openvino_backend(precision: str, deploy_graph: bool) -> Callable:
    """The ``prepare(model, x, threads, options)`` of a bench backend: OpenVINO at ``precision`` on the plain
    (``deploy_graph=False``) or the deploy export; int8 calibrated on ``options.calibration``, by default the timed
    input (speed does not depend on it). Lossy outputs are recorded, not refused."""
    from lowformer.deploy.backends import Runner, cached_export

    def prepare(model: nn.Module, x: torch.Tensor, threads: int, options: Any) -> Runner:
        from lowformer.deploy.onnx import portable_deploy
        calibration = options.calibration if options.calibration is not None else x
        graph = portable_deploy(model, x[:1]) if deploy_graph else model
        path = cached_export(graph, model, x, options, "_deploy" if deploy_graph else "")
        module = deploy_openvino(model, x[:1], precision, calibration if precision == "int8" else None, threads,
                                 deploy_graph=deploy_graph, min_cosine=-1.0, onnx_file=path)
        info = {"runtime": "openvino", "graph": module.report["graph"], "session_threads": threads,
                "openvino_cosine": module.report["check"]["min_cosine"]}

        def run() -> torch.Tensor:
            return module(x)
        return Runner(run, info)
    return prepare


def write_openvino_format(request: Any) -> dict[str, Any]:
    """``lowformer export --format openvino``: a checked IR (``.xml`` + ``.bin``), fp32 or NNCF int8."""
    from lowformer.deploy.calibration import load_calibration
    model, x = request.model.cpu(), request.example_input.cpu()
    calibration = (load_calibration(request.calibration_files, model, x.shape[-1]) if request.precision == "int8"
                   else None)
    _, report = save_openvino(model, request.out, x, request.precision, calibration, deploy_graph=request.deploy,
                              min_cosine=request.min_cosine)
    return report["check"]
