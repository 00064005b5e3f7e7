"""``lowformer export MODEL --format onnx --out FILE``: a verified ONNX file.

The file is written only when ONNX Runtime's outputs match PyTorch's (max |diff| <= 1e-4 x max |output| for
fp32; cosine for int8); otherwise the command fails with the measured difference and no file is left."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lowformer.data import eval_transform, load_image
from lowformer.deploy import default_input
from lowformer.deploy.onnx import INT8_MIN_COSINE, calibration_batches, check_onnx, export_onnx, portable_deploy, quantize_int8
from lowformer.errors import LowformerError
from lowformer.models import create_model

_logger = logging.getLogger(__name__)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPEG"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to a verified ONNX file",
                              description="Export a model to ONNX (dynamic batch), check ONNX Runtime's outputs "
                                          "against PyTorch, optionally deploy-rewritten and int8-quantized.")
    p.add_argument("model", nargs="?", default=None, help="model name, e.g. lowformer_b1 (not with --run)")
    p.add_argument("--format", choices=["onnx", "hf"], default="onnx",
                   help="onnx, or hf: a timm/Hugging Face folder (config.json + model.safetensors) for "
                        "timm.create_model('local-dir:DIR', pretrained=True)")
    p.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                   help="--format hf: export a `lowformer train` run (its model, classes, preprocessing)")
    p.add_argument("--deploy", action="store_true",
                   help="export the deploy graph (BatchNorm and GroupNorm affine folded, transposed convs as convs)")
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="int8: ONNX Runtime static quantization, calibrated on --calibration images")
    p.add_argument("--calibration", type=Path, default=None,
                   help="folder of images (searched recursively) for int8 calibration")
    p.add_argument("--calibration-count", type=int, default=64, help="how many calibration images to use")
    p.add_argument("--min-cosine", type=float, default=INT8_MIN_COSINE,
                   help="int8: lowest cosine to the fp32 outputs on the calibration images (default %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to load (any layout create_model reads)")
    p.add_argument("--image-size", type=int, default=None, help="square input size (default: the model's)")
    p.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    p.set_defaults(func=run)


def _calibration_images(model: torch.nn.Module, folder: Path | None, count: int, size: int) -> torch.Tensor:
    if folder is None:
        raise LowformerError("--precision int8 needs --calibration DIR: a folder of real images from the target data")
    files = sorted(f for f in folder.rglob("*") if f.suffix in _IMAGE_SUFFIXES)[:count]
    if not files:
        raise LowformerError(f"no images found under {folder} for int8 calibration")
    transform = eval_transform(model, input_size=(3, size, size))
    return torch.stack([transform(load_image(f)) for f in files])


def _export_hf(args: argparse.Namespace) -> int:
    from lowformer.hub import save_pretrained
    if (args.run is None) == (args.model is None):
        raise LowformerError("--format hf exports either MODEL [--checkpoint FILE] or --run RUN_DIR; give one")
    source = args.run if args.run is not None else create_model(args.model, checkpoint_path=args.checkpoint)
    out = save_pretrained(source, args.out, checkpoint=args.checkpoint if args.run is not None else None)
    print(f"wrote {out}/config.json and model.safetensors; load with timm.create_model('local-dir:{out}', "
          "pretrained=True)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.format == "hf":
        return _export_hf(args)
    if args.model is None or args.run is not None:
        raise LowformerError("--format onnx exports a MODEL name (--run is for --format hf)")
    model = create_model(args.model, checkpoint_path=args.checkpoint).eval()
    x = default_input(model)
    if args.image_size:
        x = torch.randn(1, x.shape[1], args.image_size, args.image_size)
    calibration = None
    if args.precision == "int8":
        calibration = calibration_batches(_calibration_images(model, args.calibration, args.calibration_count,
                                                              x.shape[-1]))
    graph = portable_deploy(model, x) if args.deploy else model
    if args.precision == "fp32":
        report = export_onnx(graph, args.out, x, reference=model)
    else:
        fp32 = args.out.with_suffix(".fp32.onnx")
        export_onnx(graph, fp32, x, reference=model)
        try:
            quantize_int8(fp32, args.out, calibration)
        finally:
            fp32.unlink(missing_ok=True)
        report = check_onnx(args.out, model, calibration[:1], rtol=None, min_cosine=args.min_cosine)
    print(f"wrote {args.out} ({args.precision}{', deploy graph' if args.deploy else ''}): max |diff| "
          f"{report['max_abs_diff']:.3g} of max |output| {report['max_abs_ref']:.3g}, "
          f"cosine {report['min_cosine']:.5f}")
    return 0
