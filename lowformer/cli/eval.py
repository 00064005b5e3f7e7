"""``lowformer eval MODEL --data DIR`` or ``lowformer eval --run RUN_DIR``: top-1 / top-5, throughput and
params on a folder of class sub-folders with the model's own preprocessing (the original's ``fast_eval``).

The original's spellings (``--batch_size``, ``--image_size``, ``--crop_ratio``) and timm's validate.py
ones (``-b``, ``-j``, ``--img-size``, ``--crop-pct``, ``--amp``, ``--model``) are accepted."""
from __future__ import annotations

import argparse

from lowformer.cli._args import nonnegative_int, positive_int, ratio
from lowformer.errors import LowformerError
from lowformer.evaluate import check_result_path, eval_run, imagenet_eval, write_result


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5, images/s and params of a model or a training run on an image folder",
        description="Evaluate MODEL on DIR/<class>/<image> with the preprocessing of the model's pretrained_cfg, "
                    "or a training run (--run: its model, best EMA weights, classes and validation preprocessing). "
                    "With --class-map, folder names (e.g. ImageNet wnids) are scored in the map's class index.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name, e.g. lowformer_b1 (any timm name, hf-hub:... or local-dir:DIR works)")
    p.add_argument("-m", "--model", dest="model_flag", default=None, metavar="MODEL", help="same as MODEL")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="evaluate a `lowformer train` run directory")
    p.add_argument("--data", "--data-dir", dest="data", default=None,
                   help="folder of class sub-folders, e.g. imagenet/val (with --run: default the run's val folder)")
    p.add_argument("--checkpoint", default=None, help="weights file (evalmodel.pt, model_best.pt, timm, safetensors)")
    p.add_argument("--pretrained", action="store_true",
                   help="the weights folder's file for MODEL, else timm's published weights")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size (default: the model's)")
    p.add_argument("--image-size", "--img-size", dest="image_size", type=positive_int, default=None,
                   help="evaluation resolution (default: the model's or the run's)")
    p.add_argument("--crop-ratio", "--crop-pct", dest="crop_ratio", type=ratio, default=None,
                   help="center-crop fraction (default: the model's crop_pct)")
    p.add_argument("--interpolation", default=None,
                   choices=["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"],
                   help="resize interpolation (default: the model's)")
    p.add_argument("--class-map", default=None, help="tsv 'index<TAB>folder[<TAB>name]', e.g. ImageNet's classes.tsv")
    p.add_argument("-b", "--batch-size", dest="batch_size", type=positive_int, default=50)
    p.add_argument("-j", "--workers", type=nonnegative_int, default=4, help="data-loading processes (0: none)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--amp", action="store_true", help="autocast: float16 on CUDA, bfloat16 on the CPU")
    p.add_argument("--out", default=None, metavar="FILE", help="write the metrics to FILE.json or FILE.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.model and args.model_flag and args.model != args.model_flag:
        raise LowformerError(f"two models given ('{args.model}' and --model '{args.model_flag}'); give one")
    model = args.model or args.model_flag
    if args.out:
        check_result_path(args.out)
    common = dict(image_size=args.image_size, crop_ratio=args.crop_ratio, interpolation=args.interpolation,
                  class_map=args.class_map, batch_size=args.batch_size, workers=args.workers, device=args.device,
                  amp=args.amp, progress=not args.no_progress)
    if args.run:
        if model or args.pretrained or args.num_classes:
            raise LowformerError("--run takes the model, its classes and weights from the run; leave out MODEL, "
                                 "--pretrained and --num-classes (--checkpoint picks other weights of the run)")
        result = eval_run(args.run, args.data, args.checkpoint, **common)
    else:
        if not model or not args.data:
            raise LowformerError("name a model and its data (`lowformer eval MODEL --data DIR`) or a run "
                                 "(`lowformer eval --run RUN_DIR`)")
        result = imagenet_eval(model, args.data, checkpoint_path=args.checkpoint, pretrained=args.pretrained,
                               num_classes=args.num_classes, **common)
        result.update(model=model, checkpoint=args.checkpoint)
    print(format_result(result, args.run or args.data))
    if args.out:
        write_result(args.out, result)
    return 0


def format_result(r: dict, source: str) -> str:
    return (f"{r['model']} on {source}: {r['images']} images at {r['image_size']}px "
            f"(crop {r['crop_ratio']}, {r['interpolation']}{', amp ' + r['amp'] if r['amp'] else ''}): "
            f"Top1 Acc={r['top1']:.1f} %, Top5 Acc={r['top5']:.1f} %; {r['images_per_s']:.1f} images/s, "
            f"{r['ms_per_image']:.2f} ms per image (model time); {r['params'] / 1e6:.2f} M params")
