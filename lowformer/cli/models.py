"""``lowformer models [PATTERN]``: the project's models with params and MACs at their paper resolution."""
from __future__ import annotations

import argparse
import json

from lowformer.bench.complexity import model_complexity
from lowformer.cli._args import positive_int
from lowformer.dense import is_dense_spec
from lowformer.errors import LowformerError
from lowformer.models import UnknownModelError, list_models, resolve_model_name
from lowformer.quickstart import format_model_table


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list models with params and MACs",
                              description="List the project's models with parameters and MACs (convs, linears "
                                          "and attention matmuls) at each family's paper resolution. A detector or "
                                          "segmenter ARCH:BACKBONE (retinanet:lowformer_b0, mask_rcnn:visformer_small_v2, "
                                          "ssdlite:edgeformer_s, upernet:dwnet_tiny ...) is counted at 1280x800 "
                                          "(mmdet's) or 2048x512 (mmseg's) on backbone, neck and heads (R-CNN heads "
                                          "on 1000 RoIs, masks on 100, as mmdet's get_flops), and beside it as "
                                          "the seeds' tables were: mmcv's get_flops 'FLOPs', which are MACs of convs "
                                          "(bias included), linears, norms, ReLUs and pooling layers, leaving out "
                                          "attention matmuls, GELU/SiLU/softmax and functional ops.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'lowformer_*', or a detector / "
                   "segmenter ARCH:BACKBONE, e.g. retinanet:lowformer_b0 or upernet:dwnet_tiny")
    p.add_argument("--image-size", type=positive_int, default=None, help="count MACs at this square size instead")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=run)


def matching_models(pattern: str) -> list[str]:
    """The project's models matching the shell-style ``pattern``, or the model an alias names (the
    original code's short names, e.g. ``mobilevigm``)."""
    if is_dense_spec(pattern):
        return [pattern]
    names = list_models(pattern)
    if names:
        return names
    try:
        return [resolve_model_name(pattern)]
    except UnknownModelError:
        return []


def run(args: argparse.Namespace) -> int:
    names = matching_models(args.pattern)
    if not names:
        raise LowformerError(f"no model matches '{args.pattern}'; `lowformer models` lists them all")
    rows = [model_complexity(n, image_size=args.image_size) for n in names]
    print(json.dumps(rows, indent=1) if args.json else format_model_table(rows))
    return 0
