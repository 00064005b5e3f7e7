"""``lowformer export MODEL --format onnx --out FILE``: a verified ONNX file (:func:`lowformer.deploy.export.export_model`).

The target is replaced only by a file whose ONNX Runtime outputs match PyTorch's (max |diff| <= 1e-4 x max
|output| for fp32; cosine for int8); on any failure the file that was there is left as it was. Flags are
spelled with dashes; underscore spellings are accepted as aliases."""
from __future__ import annotations

import argparse
from pathlib import Path

from lowformer.deploy.export import EXPORT_FORMATS, PRECISIONS, export_model
from lowformer.deploy.onnx import INT8_MIN_COSINE, OPSET
from lowformer.errors import LowformerError
from lowformer.models import create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to a verified ONNX file or OpenVINO IR",
                              description="Export a model to ONNX (dynamic batch), check ONNX Runtime's outputs "
                                          "against PyTorch, optionally deploy-rewritten and int8-quantized.")
    p.add_argument("model", nargs="?", default=None, help="model name, e.g. lowformer_b1 (not with --run), or a "
                   "detector / segmenter ARCH:BACKBONE, e.g. retinanet:lowformer_b0 or upernet:dwnet_tiny: a "
                   "detector's graph takes one (1, 3, H, W) image with pixels in 0..1 and returns boxes, scores, "
                   "labels (masks), post-processing included, checked output by output on the bundled photo")
    p.add_argument("--format", choices=[*EXPORT_FORMATS, "hf"], default="onnx",
                   help="export format (default onnx); hf: a timm/Hugging Face folder (config.json + "
                        "model.safetensors) for timm.create_model('local-dir:DIR', pretrained=True)")
    p.add_argument("--run", type=Path, default=None, metavar="RUN_DIR",
                   help="--format hf: export a `lowformer train` run (its model, classes, preprocessing)")
    p.add_argument("--deploy", action="store_true",
                   help="export the deploy graph (BatchNorm and GroupNorm affine folded, transposed convs as convs)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="int8: ONNX Runtime static quantization, calibrated on --calibration images")
    p.add_argument("--calibration", type=Path, default=None,
                   help="folder of images (searched recursively) for int8 calibration")
    p.add_argument("--calibration-count", "--calibration_count", dest="calibration_count", type=int, default=64,
                   help="how many calibration images to use (default %(default)s)")
    p.add_argument("--min-cosine", "--min_cosine", dest="min_cosine", type=float, default=INT8_MIN_COSINE,
                   help="int8: lowest cosine to the fp32 outputs on the calibration images (default %(default)s)")
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to load (any layout create_model reads; "
                   "for ARCH:BACKBONE a det/seg run's evalmodel.pt)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                   help="square input size (default: the model's; a detector's or segmenter's test size)")
    p.add_argument("--dynamic-size", "--dynamic_size", dest="dynamic_size", action="store_true",
                   help="fp32 ONNX of a classifier: height and width dynamic too (checked at a second size)")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (default %(default)s)")
    p.add_argument("--device", default="cpu", help="where the model is built and traced: cpu, cuda or cuda:N "
                                                   "(ONNX Runtime checks the file on the CPU)")
    p.add_argument("--out", type=Path, required=True, help="file to write (replaced only by a verified export)")
    p.set_defaults(func=run)


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
        raise LowformerError(f"--format {args.format} exports a MODEL name (--run is for --format hf)")
    r = export_model(args.model, args.out, format=args.format, precision=args.precision, deploy=args.deploy,
                     checkpoint=args.checkpoint, image_size=args.image_size, calibration=args.calibration,
                     calibration_count=args.calibration_count, min_cosine=args.min_cosine, opset=args.opset,
                     device=args.device, dynamic_size=args.dynamic_size)
    rows = ""
    if "rows" in r:
        rows = f", {' and '.join(map(str, r['rows']))} detections compared"
        if not any(r["rows"]):
            rows += " (none on the check photo, so only that was checked: export trained weights with --checkpoint)"
    print(f"wrote {r['out']} ({r['precision']}{', deploy graph' if r['deploy'] else ''}"
          f"{', dynamic size' if r['dynamic_size'] else ''}, opset {r['opset']}): "
          f"max |diff| {r['max_abs_diff']:.3g} of max |output| {r['max_abs_ref']:.3g}, cosine {r['min_cosine']:.5f}"
          + rows)
    return 0
