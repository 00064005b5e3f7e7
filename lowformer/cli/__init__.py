"""The ``lowformer`` command: one module per subcommand, each with ``register(subparsers)``.

Parsing lives here and in the subcommand modules; the work is done by library functions. Errors caused
by user input (``LowformerError``) are printed as one line, without a traceback, with exit status 2. Every
subcommand parser is a :class:`lowformer.cli._args.Parser`: each long flag takes dashes or underscores.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lowformer.cli._args import Parser
from lowformer.errors import LowformerError

_SUBCOMMANDS = ["quickstart", "models", "train", "eval", "predict", "bench", "profile", "export", "det", "seg"]


def version_string() -> str:
    import timm
    import torch

    from lowformer import __version__
    return f"lowformer {__version__} (torch {torch.__version__}, timm {timm.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lowformer", description="Hardware-efficient vision backbones on timm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=version_string())
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMANDS:
        importlib.import_module(f"lowformer.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch.utils.benchmark imports cpp_extension, which warns on every CPU-only machine that has a CUDA_HOME.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        # The subcommand's usage names the flags that would have been valid.
        _subparser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except LowformerError as e:
        print(f"lowformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowformer {args.command}: interrupted", file=sys.stderr)
        return 130


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]
