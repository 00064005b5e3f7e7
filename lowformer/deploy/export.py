"""``lowformer export`` as one library call: a model by name to a verified file, every argument checked first.

Formats are a table (``register_export_format``): ``onnx`` writes a checked ONNX file, fp32 or int8 (ONNX
Runtime static quantization calibrated on a folder of real images); ``openvino`` writes a checked OpenVINO IR
(``.xml`` + ``.bin``), fp32 or NNCF int8. Whatever the format, the target is
replaced only by a complete, verified file (:mod:`lowformer.files`), and intermediates live in a private
temporary directory that is always removed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from lowformer.deploy.backends import add_unique
from lowformer.errors import LowformerError
from lowformer.files import check_output_path

__all__ = ["ExportRequest", "EXPORT_FORMATS", "register_export_format", "export_model"]

PRECISIONS = ("fp32", "int8")


@dataclass
class ExportRequest:
    """A checked export: the model in eval mode on ``device``, an example input, the target and the options."""
    model: nn.Module
    example_input: torch.Tensor
    out: Path
    precision: str
    deploy: bool
    calibration_files: list[Path]
    min_cosine: float
    opset: int
    check_inputs: list[torch.Tensor] | None = None  # default: the example input and a random batch of two
    dynamic_size: bool = False  # fp32 ONNX only: height and width dynamic as well as the batch


@dataclass(frozen=True)
class ExportFormat:
    """``suffixes``: the target file names accepted; ``write(request) -> report`` does the export."""
    name: str
    suffixes: tuple[str, ...]
    write: Callable[[ExportRequest], dict[str, Any]]


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_export_format(fmt: ExportFormat) -> ExportFormat:
    """Add an export format; a name already taken is refused."""
    return add_unique(EXPORT_FORMATS, fmt.name, fmt, "export format")


def _write_onnx_format(request: ExportRequest) -> dict[str, Any]:
    from lowformer.deploy.calibration import load_calibration
    from lowformer.deploy.onnx import export_onnx, portable_deploy, quantize_checked
    model, x = request.model, request.example_input
    graph = portable_deploy(model, x) if request.deploy else model
    if request.precision == "fp32":
        return export_onnx(graph, request.out, x, check_inputs=request.check_inputs, reference=model,
                           opset=request.opset, dynamic_size=request.dynamic_size)
    calibration = load_calibration(request.calibration_files, model, x.shape[-1])
    module = quantize_checked(graph, model, x, calibration, out_path=request.out, min_cosine=request.min_cosine,
                              opset=request.opset)
    return module.report["check"]


def _write_openvino_format(request: ExportRequest) -> dict[str, Any]:
    from lowformer.deploy.openvino import write_openvino_format
    return write_openvino_format(request)


register_export_format(ExportFormat("onnx", (".onnx",), _write_onnx_format))
register_export_format(ExportFormat("openvino", (".xml",), _write_openvino_format))


def export_model(name: str, out: str | os.PathLike, format: str = "onnx", precision: str = "fp32",
                 deploy: bool = False, checkpoint: str | os.PathLike | None = None, image_size: int | None = None,
                 calibration: str | os.PathLike | None = None, calibration_count: int = 64,
                 min_cosine: float | None = None, opset: int | None = None, device: str = "cpu",
                 dynamic_size: bool = False) -> dict[str, Any]:
    """Export model ``name`` (weights from ``checkpoint``) to ``out``; returns the output check (max |diff|,
    max |output|, cosine) and what was written.

    Every argument (format, precision, target path and extension, opset, image size, device, calibration folder
    and count, cosine gate) is checked before the model is built. ``deploy`` exports the deploy graph (norms
    folded); ``precision="int8"`` calibrates on the first ``calibration_count`` images under ``calibration``.
    ``device`` is where the model is built and traced (ONNX Runtime checks it on the CPU). ``dynamic_size``
    (fp32 ONNX of a classifier) makes height and width dynamic, checked at a second, larger size."""
    from lowformer.deploy import default_input
    from lowformer.deploy.backends import parse_device
    from lowformer.deploy.calibration import calibration_files
    from lowformer.deploy.onnx import INT8_MIN_COSINE, OPSET, check_opset
    from lowformer.models import create_model, resolve_model_name
    if format not in EXPORT_FORMATS:
        raise LowformerError(f"unknown export format '{format}': use one of {', '.join(EXPORT_FORMATS)}")
    fmt = EXPORT_FORMATS[format]
    if precision not in PRECISIONS:
        raise LowformerError(f"unknown precision '{precision}': use one of {', '.join(PRECISIONS)}")
    from lowformer.dense import parse_dense_spec
    spec = parse_dense_spec(name)
    if spec is not None and spec.task == "detection" and (format, precision, deploy) != ("onnx", "fp32", False):
        raise LowformerError(f"{name}: detectors export as fp32 ONNX only (--format onnx, no --precision int8, no "
                             "--deploy): their post-processing runs in the graph, outside what those paths rewrite")
    out = check_output_path(out, fmt.suffixes, "--out")
    opset = check_opset(OPSET if opset is None else opset)
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise LowformerError(f"--image-size {image_size!r} is out of range: give a side of at least 1 pixel "
                             "(or leave it out for the model's)")
    min_cosine = INT8_MIN_COSINE if min_cosine is None else min_cosine
    if not -1.0 <= min_cosine <= 1.0:
        raise LowformerError(f"--min-cosine {min_cosine} is out of range: a cosine lies in [-1, 1]")
    torch_device = parse_device(device)
    files = calibration_files(calibration, calibration_count) if precision == "int8" else []
    if precision != "int8" and calibration is not None:
        raise LowformerError("--calibration is used by --precision int8 only; add --precision int8 or leave it out")
    if dynamic_size and (format, precision, spec) != ("onnx", "fp32", None):
        raise LowformerError("--dynamic-size is for fp32 ONNX exports of classifiers (--format onnx, no --precision "
                             "int8, no ARCH:BACKBONE); leave it out")
    resolve_model_name(name if spec is None else spec.backbone)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise LowformerError(f"--checkpoint {checkpoint}: no such file")

    check_inputs = None
    if spec is not None:
        model, x, check_inputs = _dense_export_model(name, spec.task, checkpoint, image_size)
        model = model.to(torch_device)
    else:
        model = create_model(name, checkpoint_path=checkpoint).eval().to(torch_device)
        if dynamic_size:
            from lowformer.deploy.onnx import check_dynamic_size
            check_dynamic_size(model)
        x = default_input(model)
        if image_size is not None:
            x = torch.randn(1, x.shape[1], image_size, image_size)
    x = x.to(torch_device)
    report = fmt.write(ExportRequest(model, x, out, precision, deploy, files, min_cosine, opset, check_inputs,
                                     dynamic_size))
    return {**report, "out": str(out), "format": format, "precision": precision, "deploy": deploy, "opset": opset,
            "image_size": x.shape[-2], "image_width": x.shape[-1], "dynamic_size": dynamic_size}


def _dense_export_model(name: str, task: str, checkpoint: str | os.PathLike | None,
                        image_size: int | None) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor] | None]:
    """A detector or segmenter ``ARCH:BACKBONE`` to export (weights from ``checkpoint``: a detection or
    segmentation run's ``evalmodel.pt``, whose class count it takes), its example input at the test size
    (``image_size`` squared when given) and the inputs to check it on.

    A detector is exported as :class:`lowformer.detection.DetectorExport` (one image in, its detections
    out) and checked on the bundled photo and its mirror image, on which a trained detector finds objects,
    rather than on noise."""
    from lowformer.checkpoints import CheckpointError, extract_state_dict, read_checkpoint
    from lowformer.dense import dense_model_from_spec, dense_test_size, set_dense_test_size
    state, num_classes = None, None
    if checkpoint is not None:
        state = extract_state_dict(read_checkpoint(checkpoint), checkpoint)
        if task == "detection" and "class_count" in state:
            num_classes = int(state["class_count"])
        elif task == "segmentation" and "net.segmentation_head.0.weight" in state:
            num_classes = int(state["net.segmentation_head.0.weight"].shape[0])
        else:
            raise CheckpointError(f"--checkpoint {checkpoint}: not a {task} model's weights (a `lowformer "
                                  f"{'det' if task == 'detection' else 'seg'} train` run's evalmodel.pt)")
    model = dense_model_from_spec(name, num_classes)
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"--checkpoint {checkpoint} does not fit {name}: {str(e).splitlines()[0]}") from None
    model.eval()
    h, w = (image_size, image_size) if image_size is not None else dense_test_size(model)
    if task == "segmentation":
        return model, torch.randn(1, 3, h, w), None
    from torchvision.transforms.v2 import functional as F

    from lowformer.data import bundled_image, load_image
    from lowformer.detection import DetectorExport
    set_dense_test_size(model, h, w)
    photo = F.to_dtype(F.pil_to_tensor(load_image(bundled_image())), torch.float32, scale=True)
    x = F.resize(photo, [h, w], antialias=True).unsqueeze(0)
    return DetectorExport(model).eval(), x, [x, x.flip(-1)]
