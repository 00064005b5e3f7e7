"""One flag vocabulary for every subcommand.

Dashes are the canonical spelling (``--batch-size``); the underscore spelling of every long flag
(``--batch_size``, as the original scripts write it) is accepted automatically, and the reverse for the
few flags registered with underscores. Explicit aliases from the original code and from timm's scripts
(``-b``, ``-j``, ``--crop-pct``...) are ordinary extra option strings of the same argument. Config
overrides with dotted keys (``--run_config.n_epochs``) are left exactly as written.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["Parser", "positive_int", "nonnegative_int", "positive_float", "ratio", "swapped_spelling"]

# argparse messages for which the usage line helps; value errors are one line of their own.
_USAGE_ERRORS = ("unrecognized arguments", "the following arguments are required", "invalid choice",
                 "one of the arguments", "expected one argument", "expected at least one argument",
                 "not allowed with argument", "ambiguous option")


def swapped_spelling(flag: str) -> str | None:
    """``--batch_size`` for ``--batch-size`` and back; None for short flags and dotted config keys."""
    if not flag.startswith("--") or "." in flag:
        return None
    body = flag[2:]
    if "_" in body:
        return "--" + body.replace("_", "-")
    if "-" in body:
        return "--" + body.replace("-", "_")
    return None


class Parser(argparse.ArgumentParser):
    """ArgumentParser that accepts both spellings of every long flag and prints one-line value errors.

    Subcommand parsers made with ``add_subparsers().add_parser`` are of this class too, so every
    subcommand gets the same vocabulary without doing anything."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)  # after "--" everything is positional
        return super().parse_known_args([self._canonical(a) for a in args[:end]] + args[end:], namespace)

    def _canonical(self, arg: str) -> str:
        """The registered spelling of ``arg`` (keeping any ``=value``) when only its other spelling is known."""
        flag, eq, value = arg.partition("=")
        if flag in self._option_string_actions:
            return arg
        other = swapped_spelling(flag)
        if other is not None and other in self._option_string_actions:
            return other + eq + value
        return arg

    def error(self, message: str) -> NoReturn:
        if message.startswith(_USAGE_ERRORS):
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a positive number")
ratio = _number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
