"""Named deploy passes: each is a pure ``GraphModule -> GraphModule`` function (the input is left untouched)
that rewrites the graph into one computing the same function faster, reusing torch's fusion maths.

Portable passes (the result still exports to ONNX and runs on any device):
``drop_dropout``, ``conv_bn``, ``linear_bn``, ``conv_transpose_as_conv``, ``group_norm_affine_into_conv``,
``sample_norm``.
CPU passes (oneDNN kernels with fused post-operations and pre-packed weights):
``pointwise_matmul`` (AVX-512 CPUs only by default), ``conv_post_ops`` and ``conv_add``; they need the shapes
recorded by ``propagate_shapes``.
"""
from __future__ import annotations

import copy
import operator
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from timm.layers.norm_act import BatchNormAct2d
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from lowformer.deploy.cpu import cpu_features
from lowformer.deploy.graph import call_modules, module_of, replace_module, single_user
from lowformer.deploy.modules import ACTIVATIONS, MkldnnConv2d, MkldnnLinear, SampleNorm, activation_attr, is_pointwise_conv

__all__ = [
    "Pass", "PORTABLE_PASSES", "CPU_PASSES", "PASSES", "propagate_shapes",
    "drop_dropout", "conv_bn", "linear_bn", "conv_transpose_as_conv", "group_norm_affine_into_conv",
    "sample_norm", "pointwise_matmul", "conv_post_ops", "conv_add", "default_passes",
]

Pass = Callable[[fx.GraphModule], fx.GraphModule]

_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own graph and module hierarchy sharing the leaf modules and tensors, which
    passes replace but never modify: cheap purity, without deep-copying the weights at every pass."""
    return fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _bypass(node: fx.Node) -> None:
    """Remove a one-input node, handing its input to its users."""
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def drop_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """Dropout, DropPath and Identity modules are identities in eval mode: remove their nodes."""
    gm = _copy(gm)
    for node, _ in call_modules(gm, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, DropPath, nn.Identity)):
        _bypass(node)
    return _finish(gm)


def _foldable_bn(bn: nn.Module) -> bool:
    """A BatchNorm in eval mode with running statistics whose forward is plain BN (or timm's BN + drop + act)."""
    known = type(bn) in _PLAIN_BN or isinstance(bn, BatchNormAct2d)
    return known and not bn.training and bn.track_running_stats and bn.running_mean is not None


def _fold_bn_after(gm: fx.GraphModule, kinds: tuple[type, ...], bn_kinds: tuple[type, ...],
                   fuse: Callable[[nn.Module, nn.Module], nn.Module]) -> fx.GraphModule:
    gm = _copy(gm)
    for node, mod in call_modules(gm, kinds):
        if type(mod) in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
            continue
        user = single_user(node)
        bn = module_of(gm, user) if user is not None else None
        if bn is None or not isinstance(bn, bn_kinds) or not _foldable_bn(bn) or user.args[0] is not node:
            continue
        replace_module(gm, node, fuse(mod, bn))
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None))
                if m is not None and not isinstance(m, nn.Identity)]
        if rest:
            replace_module(gm, user, rest[0] if len(rest) == 1 else nn.Sequential(*rest))
        else:
            _bypass(user)
    return _finish(gm)


def conv_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold an eval-mode BatchNorm into the convolution before it (torch's ``fuse_conv_bn_eval``); timm's
    BatchNormAct2d keeps its activation as a separate module."""
    return _fold_bn_after(gm, _CONVS, _PLAIN_BN + (BatchNormAct2d,), fuse_conv_bn_eval)


def linear_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold an eval-mode BatchNorm1d into the Linear before it (torch's ``fuse_linear_bn_eval``)."""
    return _fold_bn_after(gm, (nn.Linear,), (nn.BatchNorm1d,), fuse_linear_bn_eval)


def _transposed_as_conv(tconv: nn.ConvTranspose2d) -> nn.Conv2d | None:
    """The Conv2d equal to a stride-1 transposed convolution: kernel flipped, in/out swapped per group."""
    k = tconv.kernel_size
    pad = [tconv.dilation[i] * (k[i] - 1) - tconv.padding[i] for i in range(2)]
    if (tconv.stride != (1, 1) or any(p < 0 for p in pad) or tconv.output_padding != (0, 0)
            or tconv.padding_mode != "zeros"):
        return None
    g = tconv.groups
    cin, cout_g = tconv.weight.shape[:2]
    w = tconv.weight.detach().reshape(g, cin // g, cout_g, *k).transpose(1, 2).reshape(cout_g * g, cin // g, *k)
    conv = nn.Conv2d(cin, cout_g * g, k, padding=pad, dilation=tconv.dilation, groups=g,
                     bias=tconv.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w.flip(-1, -2))
        if tconv.bias is not None:
            conv.bias.copy_(tconv.bias)
    return conv


def conv_transpose_as_conv(gm: fx.GraphModule) -> fx.GraphModule:
    """Stride-1 transposed convolutions (LowFormer's last-stage attention upsampling) become ordinary
    convolutions, which have fast kernels, pre-packable weights and fusable post-ops everywhere."""
    gm = _copy(gm)
    for node, mod in call_modules(gm, nn.ConvTranspose2d):
        conv = _transposed_as_conv(mod) if type(mod) is nn.ConvTranspose2d and len(node.args) == 1 else None
        if conv is not None:
            replace_module(gm, node, conv)
    return _finish(gm)


def group_norm_affine_into_conv(gm: fx.GraphModule) -> fx.GraphModule:
    """GroupNorm (LowFormer's GroupNorm(1) pre-norms) followed only by a 1x1 convolution: its per-channel scale
    and shift move into that convolution's weights and bias; only the per-sample normalisation stays."""
    gm = _copy(gm)
    for node, gn in call_modules(gm, nn.GroupNorm):
        user = single_user(node)
        conv = module_of(gm, user) if user is not None else None
        if (not gn.affine or type(conv) is not nn.Conv2d or conv.kernel_size != (1, 1) or conv.groups != 1
                or conv.padding not in ((0, 0), "valid") or not _is_plain_group_norm(gn)):
            continue
        w = conv.weight.detach()
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, bias=True,
                           device=w.device, dtype=w.dtype)
        with torch.no_grad():
            folded.weight.copy_(w * gn.weight.detach().view(1, -1, 1, 1))
            bias = w.flatten(1) @ gn.bias.detach()
            folded.bias.copy_(bias if conv.bias is None else bias + conv.bias.detach())
        replace_module(gm, user, folded)
        replace_module(gm, node, nn.GroupNorm(gn.num_groups, gn.num_channels, eps=gn.eps, affine=False))
    return _finish(gm)


def sample_norm(gm: fx.GraphModule) -> fx.GraphModule:
    """Every plain GroupNorm(1) becomes :class:`SampleNorm`: the same function, exported as a layer norm over
    (C, H, W) that runtimes with blocked layouts normalise without reordering."""
    gm = _copy(gm)
    for node, gn in call_modules(gm, nn.GroupNorm):
        if gn.num_groups != 1 or not _is_plain_group_norm(gn):
            continue
        factory = {"device": gn.weight.device, "dtype": gn.weight.dtype} if gn.affine else {}
        norm = SampleNorm(gn.num_channels, eps=gn.eps, affine=gn.affine, **factory)
        if gn.affine:
            norm.load_state_dict(gn.state_dict())
        replace_module(gm, node, norm)
    return _finish(gm)


def _is_plain_group_norm(gn: nn.GroupNorm) -> bool:
    from timm.layers import GroupNorm1
    return type(gn) in (nn.GroupNorm, GroupNorm1)


def propagate_shapes(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Record every node's output shape (``node.meta['tensor_meta']``) for the passes that need them."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example_input)
    return gm


def _activation_of(gm: fx.GraphModule, node: fx.Node) -> tuple[str, list, str] | None:
    """The oneDNN post-op attr of an activation node (a module or functional call), else None."""
    mod = module_of(gm, node)
    if mod is not None:
        return activation_attr(mod)
    if node.op == "call_function" and node.target in ACTIVATIONS and len(node.args) == 1:
        approximate = node.kwargs.get("approximate", "none")
        return ACTIVATIONS[node.target], [], approximate if node.target is F.gelu else ""
    return None


def _input_shape(node: fx.Node) -> torch.Size | None:
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    return getattr(meta, "shape", None)


def _absorb_activation(gm: fx.GraphModule, node: fx.Node, make: Callable[[tuple[str, list, str] | None], nn.Module]
                       ) -> None:
    """Replace ``node``'s module by ``make(post_op)``, absorbing a single following activation as the post-op."""
    user = single_user(node)
    attr = _activation_of(gm, user) if user is not None else None
    replace_module(gm, node, make(attr))
    if attr is not None:
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)


def pointwise_matmul(gm: fx.GraphModule) -> fx.GraphModule:
    """1x1 convolutions (on the channels-last input deploy feeds) and Linear layers become pre-packed oneDNN
    matmuls absorbing a following activation. On AVX-512 CPUs they beat the oneDNN convolution at batch 1 (a
    LowFormer MLP chain ran 1.10x faster, whole LowFormer-B0/B1 deploy modules 1.01-1.06x); on an AVX2-only CPU
    they were within 2 % either way."""
    gm = _copy(gm)
    for node, layer in call_modules(gm, (nn.Conv2d, nn.Linear)):
        shape = _input_shape(node)
        pointwise = is_pointwise_conv(layer) and shape is not None and len(shape) == 4
        if not (pointwise or type(layer) is nn.Linear) or len(node.args) != 1 or node.kwargs:
            continue
        _absorb_activation(gm, node, lambda attr, layer=layer, shape=shape: MkldnnLinear(layer, attr, shape))
    return _finish(gm)


def conv_post_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """2-D (transposed) convolutions become oneDNN ones with pre-packed weights, absorbing a following activation
    (ReLU, GELU, Hardswish, SiLU, ...) as a post-op, so the activation costs no extra pass over memory."""
    gm = _copy(gm)
    for node, conv in call_modules(gm, (nn.Conv2d, nn.ConvTranspose2d)):
        if (type(conv) not in (nn.Conv2d, nn.ConvTranspose2d) or conv.padding_mode != "zeros"
                or isinstance(conv.padding, str) or len(node.args) != 1 or node.kwargs):
            continue
        _absorb_activation(gm, node, lambda attr, conv=conv, node=node: MkldnnConv2d(conv, attr, _input_shape(node)))
    return _finish(gm)


def conv_add(gm: fx.GraphModule) -> fx.GraphModule:
    """A residual ``conv(x) + y`` or ``linear(x) + y`` (same shape) becomes one oneDNN call with a binary-add
    post-op."""
    gm = _copy(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node, conv in call_modules(gm, (MkldnnConv2d, MkldnnLinear)):
        user = single_user(node)
        if (conv.attr != "none" or getattr(conv, "transposed", False) or conv.other is not None or user is None
                or user.op != "call_function" or user.target not in (operator.add, torch.add)
                or len(user.args) != 2 or user.kwargs):
            continue
        other = user.args[1] if user.args[0] is node else user.args[0]
        out_meta, other_meta = node.meta.get("tensor_meta"), getattr(other, "meta", {}).get("tensor_meta")
        if (other is node or not isinstance(other, fx.Node) or order[other] > order[node] or out_meta is None
                or other_meta is None or out_meta.shape != other_meta.shape):
            continue
        replace_module(gm, node, conv.with_residual())
        node.args = (node.args[0], other)
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
    return _finish(gm)


PORTABLE_PASSES: dict[str, Pass] = {
    "drop_dropout": drop_dropout,
    "conv_bn": conv_bn,
    "linear_bn": linear_bn,
    "conv_transpose_as_conv": conv_transpose_as_conv,
    "group_norm_affine_into_conv": group_norm_affine_into_conv,
    "sample_norm": sample_norm,
}
CPU_PASSES: dict[str, Pass] = {
    "pointwise_matmul": pointwise_matmul,
    "conv_post_ops": conv_post_ops,
    "conv_add": conv_add,
}
PASSES: dict[str, Pass] = {**PORTABLE_PASSES, **CPU_PASSES}


def default_passes() -> list[str]:
    """Every pass that pays on this machine: ``pointwise_matmul`` only where the CPU has AVX-512."""
    return [n for n in PASSES if n != "pointwise_matmul" or cpu_features().avx512]
