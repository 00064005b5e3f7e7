"""Checking that a deployed model (PyTorch module, ONNX Runtime session, benchmark backend) computes what the
eager model does: one comparison (:func:`compare_outputs`), one rule (:func:`verify_outputs`), one error."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lowformer.errors import LowformerError

__all__ = ["OutputMismatchError", "DeployMismatchError", "DEFAULT_RTOL", "compare_outputs", "verify_outputs", "count_norms"]

# max |deployed - eager| <= DEFAULT_RTOL * max |eager| for an fp32 deployment
DEFAULT_RTOL = 1e-4


class OutputMismatchError(LowformerError):
    """A deployed model, exported file or benchmark backend whose outputs differ from the eager model's."""


# the name under which ``lowformer.deploy`` has always raised it
DeployMismatchError = OutputMismatchError


def _as_tensor(y: object) -> torch.Tensor:
    if isinstance(y, (list, tuple)):
        return torch.cat([_as_tensor(t).flatten() for t in y])
    if isinstance(y, dict):
        return torch.cat([_as_tensor(t).flatten() for t in y.values()])
    return torch.as_tensor(y).detach().float().cpu()


@torch.inference_mode()
def compare_outputs(reference: Callable, candidate: Callable, inputs: Iterable[torch.Tensor]) -> dict[str, float]:
    """Worst case over ``inputs`` of: max |difference|, max |reference|, their ratio, and the lowest per-sample
    cosine similarity of the flattened outputs (a reference module gets the inputs on its own device)."""
    worst = {"max_abs_diff": 0.0, "max_abs_ref": 0.0, "rel_diff": 0.0, "min_cosine": 1.0}
    param = next(reference.parameters(), None) if isinstance(reference, nn.Module) else None
    for x in inputs:
        ref = _as_tensor(reference(x.to(param.device) if param is not None else x))
        out = _as_tensor(candidate(x))
        if ref.shape != out.shape:
            raise OutputMismatchError(f"output shape {tuple(out.shape)} differs from the eager {tuple(ref.shape)} "
                                      f"for an input of shape {tuple(x.shape)}")
        if ref.numel() == 0:  # e.g. no detections on either side: nothing differs
            continue
        diff, scale = (out - ref).abs().max().item(), ref.abs().max().item()
        cosine = F.cosine_similarity(out.reshape(len(x), -1), ref.reshape(len(x), -1), dim=1).min().item()
        worst["max_abs_diff"] = max(worst["max_abs_diff"], diff)
        worst["max_abs_ref"] = max(worst["max_abs_ref"], scale)
        worst["rel_diff"] = max(worst["rel_diff"], diff / max(scale, 1e-12))
        worst["min_cosine"] = min(worst["min_cosine"], cosine)
    return worst


_DEPLOY_HINT = "deploy with fewer passes (passes=...) to find the rewrite at fault"


def verify_outputs(reference: Callable, candidate: Callable, inputs: Iterable[torch.Tensor], what: str,
                   rtol: float | None = DEFAULT_RTOL, min_cosine: float | None = None,
                   hint: str = _DEPLOY_HINT) -> dict[str, float]:
    """:func:`compare_outputs`, raising OutputMismatchError naming ``what`` (and ``hint``, the way out) when
    max |diff| exceeds ``rtol`` x max |reference output| or the cosine falls below ``min_cosine`` (low precision)."""
    result = compare_outputs(reference, candidate, inputs)
    if rtol is not None and not result["rel_diff"] <= rtol:
        raise OutputMismatchError(
            f"{what} diverges from the eager model: max |diff| {result['max_abs_diff']:.3g} is "
            f"{result['rel_diff']:.2g} of max |output| {result['max_abs_ref']:.3g} (allowed {rtol:g}); {hint}")
    if min_cosine is not None and not result["min_cosine"] >= min_cosine:
        raise OutputMismatchError(
            f"{what} diverges from the eager model: cosine similarity {result['min_cosine']:.4f} "
            f"< {min_cosine} (max |diff| {result['max_abs_diff']:.3g}); use more calibration images, fp32, or accept "
            "it with a lower min_cosine")
    return result


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_NORM_FUNCTIONS = {torch.batch_norm, F.batch_norm, F.group_norm, F.layer_norm, torch.layer_norm}


def count_norms(module: nn.Module) -> dict[str, int]:
    """Norm layers by kind (modules, plus functional calls when ``module`` is a GraphModule), so a report can
    say how many were folded and how many remain."""
    counts: dict[str, int] = {}
    nodes = list(module.graph.nodes) if isinstance(module, fx.GraphModule) else []
    used = {n.target for n in nodes if n.op == "call_module"}
    for name, m in module.named_modules():
        if isinstance(m, _NORMS) and (not nodes or name in used):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    for n in nodes:
        if n.op == "call_function" and n.target in _NORM_FUNCTIONS:
            counts[n.target.__name__] = counts.get(n.target.__name__, 0) + 1
    return counts
