"""``lowformer quickstart``: the main job on bundled defaults, a tour of what the project does
(``lowformer.quickstart.quickstart``)."""
from __future__ import annotations

import argparse

from lowformer.cli._args import nonnegative_int, positive_int
from lowformer.quickstart import quickstart


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quickstart", help="tour on bundled defaults: model table, inference, timing")
    p.add_argument("--model", default="lowformer_b0", help="model to run on the bundled image")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for the timing")
    p.add_argument("--train-epochs", type=nonnegative_int, default=3,
                   help="epochs of the bundled-CIFAR-10 training demo (0 skips it)")
    p.add_argument("--train-path", default=None, help="keep the demo's run directory here (default: a temporary one)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quickstart(args.model, threads=args.threads, train_epochs=args.train_epochs, train_path=args.train_path)
    return 0
