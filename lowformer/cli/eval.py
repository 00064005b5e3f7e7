"""``lowformer eval MODEL --data DIR``: top-1 / top-5 on a folder of class sub-folders with the model's
own preprocessing (the original's ``fast_eval``)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lowformer.evaluate import imagenet_eval
from lowformer.models import create_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="top-1/top-5 of a model on an image folder",
        description="Evaluate MODEL on DIR/<class>/<image> with the preprocessing of the model's pretrained_cfg. "
                    "With --class-map, folder names (e.g. ImageNet wnids) are scored in the map's class index.")
    p.add_argument("model", help="model name, e.g. lowformer_b1 (any timm name works)")
    p.add_argument("--data", required=True, help="folder of class sub-folders, e.g. imagenet/val")
    p.add_argument("--checkpoint", default=None, help="weights file (evalmodel.pt, model_best.pt, timm, safetensors)")
    p.add_argument("--pretrained", action="store_true", help="use the weights folder's file for MODEL")
    p.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's, 1000)")
    p.add_argument("--image-size", type=int, default=None, help="evaluation resolution (default: the model's)")
    p.add_argument("--crop-ratio", type=float, default=None, help="center-crop fraction (default: the model's crop_pct)")
    p.add_argument("--interpolation", default=None, help="resize interpolation, e.g. bicubic (default: the model's)")
    p.add_argument("--class-map", default=None, help="tsv 'index<TAB>folder[<TAB>name]', e.g. ImageNet's classes.tsv")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="write the metrics to this JSON file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    model = create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint, **kwargs)
    result = imagenet_eval(model, args.data, image_size=args.image_size, crop_ratio=args.crop_ratio,
                           interpolation=args.interpolation, class_map=args.class_map, batch_size=args.batch_size,
                           workers=args.workers, device=args.device)
    result["model"] = args.model
    result["checkpoint"] = args.checkpoint
    print(f"{args.model} on {args.data}: {result['images']} images at {result['image_size']}px "
          f"(crop {result['crop_ratio']}, {result['interpolation']}): "
          f"Top1 Acc={result['top1']:.3f}, Top5 Acc={result['top5']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0
