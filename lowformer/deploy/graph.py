"""Tracing a model into a torch.fx GraphModule for the deploy passes, and the small graph helpers they share.

The tracer first tries to look inside every module, so that rewrites reach the convolutions hidden in
blocks that timm keeps opaque for feature extraction (LowFormer's ConvAttention traces fine on torch 2.x);
when that fails it retries with timm's leaf list, and the caller falls back to module-level rewrites when
both fail. BatchNorm and GroupNorm subclasses (timm's BatchNormAct2d, GroupNorm1) stay leaves so a pass can fold them.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import torch.fx as fx
import torch.nn as nn
from timm.layers import get_notrace_functions, get_notrace_modules

__all__ = ["DeployTracer", "trace", "module_of", "replace_module", "single_user", "call_modules"]

_logger = logging.getLogger(__name__)


class DeployTracer(fx.Tracer):
    """fx tracer whose leaves are torch's own modules, every BatchNorm / GroupNorm subclass
    (so passes can fold them), and ``extra_leaves``."""

    def __init__(self, extra_leaves: tuple[type, ...] = ()) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.extra_leaves = extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) or isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` as deep as possible; raises the last tracing error when even timm's leaves fail."""
    last_error: Exception | None = None
    for leaves in ((), tuple(get_notrace_modules())):
        try:
            tracer = DeployTracer(leaves)
            graph = tracer.trace(model)
            return fx.GraphModule(tracer.root, graph, model.__class__.__name__)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "try with more leaves"
            _logger.debug("fx trace of %s with %d extra leaves failed: %s", type(model).__name__, len(leaves), e)
            last_error = e
    raise last_error


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    """The module a ``call_module`` node calls, else None."""
    if node.op != "call_module":
        return None
    return gm.get_submodule(node.target)


def replace_module(gm: fx.GraphModule, node: fx.Node, new: nn.Module) -> None:
    """Swap the module a ``call_module`` node calls (its parent attribute too, so state dicts stay consistent)."""
    parent_name, _, name = node.target.rpartition(".")
    setattr(gm.get_submodule(parent_name) if parent_name else gm, name, new)


def single_user(node: fx.Node) -> fx.Node | None:
    """The only user of ``node``'s output, or None when it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def call_modules(gm: fx.GraphModule, kind: type | tuple[type, ...]) -> Iterator[tuple[fx.Node, Any]]:
    """``(node, module)`` for every ``call_module`` node whose module is an instance of ``kind`` (a snapshot,
    so the graph may be edited while iterating)."""
    for node in list(gm.graph.nodes):
        mod = module_of(gm, node)
        if mod is not None and isinstance(mod, kind):
            yield node, mod
