"""``lowformer models [PATTERN]``: the project's models with params and MACs at their paper resolution."""
from __future__ import annotations

import argparse
import json

from lowformer.bench.complexity import model_complexity
from lowformer.errors import LowformerError
from lowformer.models import list_models
from lowformer.segmentation import is_segmenter_spec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list models with params and MACs",
                              description="List the project's models with parameters and MACs (convs, linears "
                                          "and attention matmuls) at each family's paper resolution.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'lowformer_*', or a segmenter ARCH:BACKBONE, e.g. upernet:dwnet_tiny")
    p.add_argument("--image-size", type=int, default=None, help="count MACs at this square size instead")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.set_defaults(func=run)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'model':<32} {'params (M)':>10} {'MACs (M)':>10} {'resolution':>10}"]
    for r in rows:
        lines.append(f"{r['model']:<32} {r['params'] / 1e6:>10.2f} {r['macs'] / 1e6:>10.1f} "
                     f"{r.get('image_width', r['image_size']):>6}x{r['image_size']:<3}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    names = [args.pattern] if is_segmenter_spec(args.pattern) else list_models(args.pattern)
    if not names:
        raise LowformerError(f"no model matches '{args.pattern}'; `lowformer models` lists them all")
    rows = [model_complexity(n, image_size=args.image_size) for n in names]
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
