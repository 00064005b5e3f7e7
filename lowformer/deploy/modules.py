"""Modules the deploy passes put into a graph: oneDNN convolutions with fused post-ops and pre-packed weights
(CPU passes), and GroupNorm(1) in a form that exports as a layer norm (portable).

These are the kernels PyTorch's own inductor uses for CPU convolutions (``torch.ops.mkldnn``); calling them
from eager code gives the same fusion without compilation. Eager ``nn.Conv2d`` at batch 1 often dispatches to
the slow im2col path, re-orders its weights on every call, and runs the activation as a separate pass.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation_attr", "MkldnnConv2d", "MkldnnLinear", "SampleNorm", "is_pointwise_conv",
           "mkldnn_available"]

# functional / module activations oneDNN can apply as a convolution post-op, by oneDNN attr name
ACTIVATIONS = {
    F.relu: "relu", torch.relu: "relu", F.gelu: "gelu", F.hardswish: "hardswish", F.silu: "swish",
    torch.sigmoid: "sigmoid", torch.tanh: "tanh", F.hardsigmoid: "hardsigmoid",
}
_ACTIVATION_MODULES = {
    nn.ReLU: "relu", nn.GELU: "gelu", nn.Hardswish: "hardswish", nn.SiLU: "swish", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid",
}


def mkldnn_available() -> bool:
    """oneDNN convolutions with post-ops exist in this torch build."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def activation_attr(mod: nn.Module) -> tuple[str, list, str] | None:
    """``(attr, scalars, algorithm)`` of a post-op equal to this activation module, else None."""
    if type(mod) in _ACTIVATION_MODULES:
        algorithm = getattr(mod, "approximate", "") if type(mod) is nn.GELU else ""
        return _ACTIVATION_MODULES[type(mod)], [], algorithm
    if type(mod) is nn.ReLU6:
        return "hardtanh", [0.0, 6.0], ""
    if type(mod) is nn.Hardtanh:
        return "hardtanh", [mod.min_val, mod.max_val], ""
    return None


class _SampleNormExport(torch.autograd.Function):
    """``group_norm(x, 1) * scale + bias``, exported as one LayerNormalization over every axis but the batch, its
    scale and bias broadcast from (C, 1, 1): no constant of the input's size is written, so the graph keeps any
    H x W. Opsets before 17 (no LayerNormalization) get the same normalisation as reductions."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        return F.group_norm(x, 1, eps=eps) * scale + bias

    @staticmethod
    def symbolic(g, x, scale, bias, eps: float):
        if g.opset >= 17:
            return g.op("LayerNormalization", x, scale, bias, axis_i=1, epsilon_f=eps)
        axes = [1, 2, 3]  # 4-D inputs only (see SampleNorm.forward)
        d = g.op("Sub", x, g.op("ReduceMean", x, axes_i=axes, keepdims_i=1))
        var = g.op("ReduceMean", g.op("Mul", d, d), axes_i=axes, keepdims_i=1)
        std = g.op("Sqrt", g.op("Add", var, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
        return g.op("Add", g.op("Mul", g.op("Div", d, std), scale), bias)


class SampleNorm(nn.GroupNorm):
    """GroupNorm(1): each sample normalised over all its channels and positions, then the per-channel affine.

    PyTorch runs it as ``group_norm``, which keeps channels-last tensors channels-last (``layer_norm`` would copy
    them to NCHW). Exported (4-D inputs), it is one LayerNormalization over (C, H, W) rather than the exporter's
    reshape to (N, 1, C*H*W) and back: OpenVINO then normalises its blocked-layout tensors in place instead of
    reordering them to plain NCHW and back around every norm.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__(1, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export() or x.dim() != 4:
            return F.group_norm(x, 1, self.weight, self.bias, self.eps)
        if self.affine:
            scale, bias = self.weight.view(-1, 1, 1), self.bias.view(-1, 1, 1)
        else:
            scale, bias = x.new_ones(1, 1, 1), x.new_zeros(1, 1, 1)
        return _SampleNormExport.apply(x, scale, bias, self.eps)


class _PostOpModule(nn.Module):
    """A oneDNN kernel with a fused activation (``attr``) that may also add a second input (``other``)."""

    attr: str
    other: str | None

    def with_residual(self) -> _PostOpModule:
        """A copy that adds its second input to the output (a binary post-op)."""
        new = copy.copy(self)
        new.other = "add"
        return new


class MkldnnConv2d(_PostOpModule):
    """A Conv2d or ConvTranspose2d (+ activation, + residual add for Conv2d) computed by one oneDNN call.

    ``forward(x)`` or, after :meth:`with_residual`, ``forward(x, other)`` = act(conv(x)) + other.
    :meth:`prepack` re-orders the weights once into oneDNN's blocked layout for the recorded input shape."""

    def __init__(self, conv: nn.Conv2d | nn.ConvTranspose2d, post_op: tuple[str, list, str] | None = None,
                 input_shape: torch.Size | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self.transposed = isinstance(conv, nn.ConvTranspose2d)
        self.output_padding = list(conv.output_padding) if self.transposed else None
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.attr, self.scalars, self.algorithm = post_op or ("none", [], "")
        self.input_shape = None if input_shape is None else list(input_shape)
        self.other: str | None = None
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Re-order the weights once for the recorded input shape (they were re-ordered on every call)."""
        if self.input_shape is None or self.weight.dtype not in (torch.float32, torch.bfloat16):
            return
        if self.transposed:
            self.packed = torch.ops.mkldnn._reorder_convolution_transpose_weight(
                self.weight.detach(), self.padding, self.output_padding, self.stride, self.dilation, self.groups,
                self.input_shape)
        else:
            self.packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, self.input_shape)

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        w = self.packed if self.packed is not None and x.dtype == self.weight.dtype else self.weight
        if self.transposed:
            return torch.ops.mkldnn._convolution_transpose_pointwise(
                x, w, self.bias, self.padding, self.output_padding, self.stride, self.dilation, self.groups,
                self.attr, self.scalars, self.algorithm)
        if self.other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, w, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.attr, self.scalars, self.algorithm)
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, w, self.bias, self.padding, self.stride, self.dilation, self.groups,
            self.other, None, None, [], None)

    def extra_repr(self) -> str:
        return (f"transposed={self.transposed}, kernel_size={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, post_op={self.attr}, "
                f"residual={self.other is not None}, packed={self.packed is not None}")


def is_pointwise_conv(conv: nn.Module) -> bool:
    """A 1x1 convolution without stride, padding or groups: a matmul over channels at every pixel."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1 and conv.padding_mode == "zeros")


class MkldnnLinear(_PostOpModule):
    """A Linear, or a 1x1 convolution (:func:`is_pointwise_conv`) computed on the ``[N*H*W, C]`` view of its
    channels-last input, as one oneDNN matmul (+ activation, + residual add) with pre-packed weights.

    oneDNN's matmul skips the convolution primitive's per-call set-up and blocked-layout handling, which at
    batch 1 costs more than the arithmetic of a small 1x1 convolution."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, post_op: tuple[str, list, str] | None = None,
                 input_shape: torch.Size | None = None) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        self.weight = nn.Parameter(layer.weight.detach().flatten(1).clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.attr, self.scalars, self.algorithm = post_op or ("none", [], "")
        self.other = None
        self.rows = None
        if input_shape is not None:
            dims = list(input_shape)
            self.rows = dims[0] * dims[2] * dims[3] if self.conv else math.prod(dims[:-1])
        self.packed: torch.Tensor | None = None

    def prepack(self) -> None:
        """Re-order the weights once for the recorded number of rows (any other count still computes correctly)."""
        if self.rows is not None and self.weight.dtype in (torch.float32, torch.bfloat16):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), self.rows)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        # a view for channels-last input (what deploy feeds), a copy otherwise
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if self.conv else x.reshape(-1, x.shape[-1])

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        w = self.packed if self.packed is not None and x.dtype == self.weight.dtype else self.weight
        if self.other is None:
            y = torch.ops.mkldnn._linear_pointwise(self._rows(x), w, self.bias, self.attr, self.scalars,
                                                   self.algorithm)
        else:
            y = torch.ops.mkldnn._linear_pointwise.binary(self._rows(x), self._rows(other), w, self.bias, self.other)
        if self.conv:
            n, _, h, w_ = x.shape
            return y.view(n, h, w_, -1).permute(0, 3, 1, 2)
        return y.view(*x.shape[:-1], -1)

    def extra_repr(self) -> str:
        return (f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, conv1x1={self.conv}, "
                f"post_op={self.attr}, residual={self.other is not None}, packed={self.packed is not None}")
