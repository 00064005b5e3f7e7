"""``lowformer profile MODEL``: params, MACs, and MACs and time per stage and per operator.

Flags are spelled with dashes; underscore spellings are accepted as aliases."""
from __future__ import annotations

import argparse
import json

import torch

from lowformer.bench.profile import profile_model


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("profile", help="where a model's cost goes: MACs and time per stage and operator",
                              description="Params and MACs, a per-stage breakdown of MACs and time, and the torch "
                                          "profiler's per-operator table.")
    p.add_argument("model", help="model name (project, timm, or the original's --other name)")
    p.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=224)
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="same as --device cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--iterations", type=int, default=20, help="timed passes for the per-stage times")
    p.add_argument("--warmup", type=int, default=5, help="untimed passes first")
    p.add_argument("--no-deploy", "--no_deploy", dest="deploy", action="store_false", help="profile the training form")
    p.add_argument("--rows", type=int, default=15, help="rows of the per-operator table")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run)


def format_profile(r: dict) -> str:
    lines = [f"{r['model']} at {r['image_size']}x{r['image_size']}, batch {r['batch_size']}, {r['threads']} thread(s): "
             f"{r['params'] / 1e6:.2f} M params, {r['macs'] / 1e6:.1f} M MACs, median {r['median_ms']:.2f} ms",
             f"{'stage':<24} {'MACs M':>9} {'MACs %':>7} {'median ms':>10} {'time %':>7}"]
    stage_ms = sum(s["median_ms"] for s in r["stages"]) or 1.0
    for s in r["stages"]:
        lines.append(f"{s['stage']:<24} {s['macs'] / 1e6:>9.1f} {100 * s['macs'] / max(r['macs'], 1):>6.1f}% "
                     f"{s['median_ms']:>10.3f} {100 * s['median_ms'] / stage_ms:>6.1f}%")
    lines += ["", "per operator (torch.profiler):", r["operator_table"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = profile_model(args.model, image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                           threads=args.threads, iterations=args.iterations, warmup=args.warmup, deploy=args.deploy,
                           row_limit=args.rows)
    print(json.dumps(result, indent=1) if args.json else format_profile(result))
    return 0
