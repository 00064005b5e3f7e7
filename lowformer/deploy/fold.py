"""Input-size folding: for one fixed input size, weights that a model resizes from the input shape on every
forward are constants. Computing them once turns EdgeFormer's global circular convolutions (kernels and
position embeddings resampled to the feature size) into ordinary fixed-size depthwise convolutions, which the
ONNX exporter, ONNX Runtime and OpenVINO can express, and which cost no interpolation per call.

The folded model computes exactly what the original does at that input size (the resampling is the same call,
done once).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import fx

__all__ = ["FixedCircularConv", "circular_conv", "fold_input_size", "needs_input_size_folding"]


def circular_conv(x: torch.Tensor, weight: torch.Tensor, meta_weight: torch.Tensor, axis: int) -> torch.Tensor:
    """Circular depthwise conv with ``weight`` (already resampled to one length) when ``x`` has that length along
    ``axis`` or is being traced for export; else with ``meta_weight`` resampled to ``x``'s length."""
    n = x.shape[axis]
    if not torch.jit.is_tracing() and n != weight.shape[axis]:
        _, _, resize = _kinds()
        weight = resize(meta_weight, n, axis)
    n = weight.shape[axis]
    x = torch.cat([x, x.narrow(axis, 0, n - 1)], dim=axis)
    return F.conv2d(x, weight, groups=weight.shape[0])


# a leaf for torch.fx, so a deploy graph keeps the size check and serves every input size
fx.wrap("circular_conv")


class FixedCircularConv(nn.Module):
    """EdgeFormer's global circular convolution with its kernel resampled once to the axis length ``n`` seen at
    folding: out[i] = sum_j k[j] * x[(i + j) mod n], an unpadded depthwise conv over ``x`` with its first n - 1
    rows (columns) appended. Another length resamples the stored meta kernel as the original does."""

    def __init__(self, meta_weight: torch.Tensor, length: int, axis: int) -> None:
        super().__init__()
        _, _, resize = _kinds()
        self.meta_weight = nn.Parameter(meta_weight.detach().clone(), requires_grad=False)
        self.weight = nn.Parameter(resize(meta_weight.detach(), length, axis), requires_grad=False)
        self.axis, self.length, self.groups = axis, length, meta_weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return circular_conv(x, self.weight, self.meta_weight, self.axis)

    def extra_repr(self) -> str:
        return f"channels={self.groups}, length={self.length}, axis={self.axis}"


def _kinds() -> tuple[type, type, Callable]:
    from lowformer.models.edgeformer import GccBlock, GlobalCircularConv, _resize_along
    return GlobalCircularConv, GccBlock, _resize_along


def needs_input_size_folding(model: nn.Module) -> bool:
    """Whether ``model`` has weights resized from the input shape (so its export needs a fixed size)."""
    circular, block, _ = _kinds()
    return any(isinstance(m, (circular, block)) for m in model.modules())


@torch.no_grad()
def fold_input_size(model: nn.Module, example_input: torch.Tensor, fixed_size: bool = True) -> nn.Module:
    """A copy of ``model`` with its input-size-dependent weights computed for ``example_input``'s spatial size
    (``model`` itself when it has none); the caller's model is left untouched.

    Circular kernels keep their meta kernel for other sizes. ``fixed_size`` also replaces the position embeddings
    by their resampled values (for an export, which is for one size; the model then computes another function
    at other sizes)."""
    if not needs_input_size_folding(model):
        return model
    circular, block, resize = _kinds()
    model = copy.deepcopy(model)
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[2:4]))
    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, (circular, block))]
    try:
        model(example_input[:1])
    finally:
        for h in hooks:
            h.remove()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, circular) and child in sizes:
                setattr(parent, name, FixedCircularConv(child.weight, sizes[child][child.axis - 2], child.axis))
    for m, (h, w) in sizes.items():
        if fixed_size and isinstance(m, block) and m.pos_embed_a1 is not None:
            # resampling to the size a tensor already has is the identity (aligned corners), so the block's own
            # forward keeps computing the same function while the exporter sees constant-size embeddings
            for attr, size, dim in (("pos_embed_a1", h, 2), ("pos_embed_b1", w, 3), ("pos_embed_a2", w, 3),
                                    ("pos_embed_b2", h, 2)):
                setattr(m, attr, nn.Parameter(resize(getattr(m, attr), size, dim), requires_grad=False))
    return model
