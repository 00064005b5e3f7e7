"""``lowformer predict MODEL IMAGE... [--checkpoint FILE] [--topk 5]`` or ``lowformer predict --run RUN_DIR
IMAGE...``: the top classes of each image, by name (ImageNet's for 1000-class models, a run's own classes)."""
from __future__ import annotations

import argparse
import json

from lowformer.cli._args import positive_int
from lowformer.errors import LowformerError
from lowformer.evaluate import predict


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict", help="top classes of image files, with class names",
        description="Classify image files with a model's own preprocessing and print the top classes by name. "
                    "Without --run the first argument is the model (any name create_model takes).")
    p.add_argument("inputs", nargs="+", metavar="MODEL IMAGE", help="model name then image files (with --run: images)")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="a `lowformer train` run: its model and classes")
    p.add_argument("--checkpoint", default=None, help="weights file (any layout create_model reads)")
    p.add_argument("--pretrained", action="store_true",
                   help="the weights folder's file for MODEL, else timm's published weights")
    p.add_argument("--topk", "--top-k", dest="topk", type=positive_int, default=5, help="classes per image")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON records instead of lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.run:
        if args.pretrained:
            raise LowformerError("--run takes the weights from the run; leave out --pretrained")
        model, images = None, list(args.inputs)
    elif len(args.inputs) < 2:
        raise LowformerError("name a model and at least one image: `lowformer predict lowformer_b0 cat.jpg`")
    else:
        model, *images = args.inputs
    records = predict(model, images, topk=args.topk, device=args.device, checkpoint_path=args.checkpoint,
                      pretrained=args.pretrained, run_dir=args.run)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    for r in records:
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['probability']:6.2f} %  {t['index']:4d}  {t['name']}")
    return 0
