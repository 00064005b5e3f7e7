"""The project's error base class: the command line prints these as one line, without a traceback."""
from __future__ import annotations

import importlib
from types import ModuleType


class LowformerError(Exception):
    """An error caused by user input (a name, a file, a config key) whose message says how to fix it."""


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or raise one line naming ``purpose`` and the install command
    (``pip install 'lowformer[extra]'``) instead of an ImportError traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("_", "-")
        raise LowformerError(f"{purpose} needs {package}: pip install 'lowformer[{extra}]'") from None
