"""EdgeFormer (ParC-Net): global circular convolutions with position embeddings in a meta-former block

- `EdgeFormer: Improving Light-weight ConvNets by Learning from Vision Transformers` (arXiv v1 title),
  later `ParC-Net: Position Aware Circular Convolution with Merits from ConvNets and Transformer` (ECCV 2022)
  - https://arxiv.org/abs/2203.03952
- code: https://github.com/hkzhang91/EdgeFormer (snapshot f430ced, a fork of Apple's cvnets / MobileViT)

@inproceedings{zhang2022parc,
  title={ParC-Net: Position Aware Circular Convolution with Merits from ConvNets and Transformer},
  author={Zhang, Haokui and Hu, Wenze and Wang, Xiaoyu},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022},
}

Re-implemented for lowformer in timm's model-file layout from the spec of the original snapshot. Outputs
match the original for square inputs. Unlike the original (square only: it sizes every kernel and position
embedding from the height), non-square inputs work: what runs along H is resized to H, along W to W.

Input convention of the original weights: BGR channel order, values in [0, 1], no mean/std.
"""
from __future__ import annotations

import math
import re
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    ConvNormAct,
    DropPath,
    Mlp,
    calculate_drop_path_rates,
    register_notrace_module,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import InvertedResidual

from lowformer.data.images import BGR_INPUT_NOTE
from lowformer.models._api import ClassifierHeadModel
from lowformer.models._dense import check_output_stride, default_out_indices, dilate_stages, select_taps
from lowformer.models._registry import record

__all__ = ["EdgeFormer"]


def _resize_along(t: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Resample a meta kernel or position embedding (singleton on the other spatial axis) to ``size``
    along ``dim`` (2 = H, 3 = W) by 1-d linear interpolation with aligned corners, as the original does
    on every forward."""
    target = (size, 1) if dim == 2 else (1, size)
    return F.interpolate(t, size=target, mode="bilinear", align_corners=True)


@register_notrace_module  # sizes its kernel from the input shape
class GlobalCircularConv(nn.Module):
    """Depthwise circular cross-correlation over the whole axis: out[i] = sum_j k[j] * x[(i + j) mod n].

    The kernel is stored at the design length ``meta_size`` (the feature side at a 256x256 input) and
    resampled to the current axis length n at run time. The wrap is built as in the original, by appending
    the first n - 1 rows (columns) after the last and running an unpadded convolution."""

    def __init__(self, dim: int, meta_size: int, vertical: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.dim = dim
        self.axis = 2 if vertical else 3
        shape = (dim, 1, meta_size, 1) if vertical else (dim, 1, 1, meta_size)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        bound = 1 / math.sqrt(meta_size)  # the original keeps PyTorch's default conv init for these
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[self.axis]
        weight = _resize_along(self.weight, n, self.axis)
        x = torch.cat([x, x.narrow(self.axis, 0, n - 1)], dim=self.axis)
        return F.conv2d(x, weight, groups=self.dim)


class SqueezeExcite(nn.Module):
    """Channel gate with BatchNorm inside and no biases (EdgeFormer's ``ca``):
    x * hardsigmoid(BN(fc(hardswish(BN(fc(mean x))))))."""

    def __init__(
            self,
            dim: int,
            rd_dim: int,
            act_layer: Type[nn.Module] = nn.Hardswish,
            gate_layer: Type[nn.Module] = nn.Hardsigmoid,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        self.fc1 = nn.Conv2d(dim, rd_dim, 1, bias=False, **dd)
        self.bn1 = norm_layer(rd_dim, **dd)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_dim, dim, 1, bias=False, **dd)
        self.bn2 = norm_layer(dim, **dd)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.gate(self.bn2(self.fc2(self.act(self.bn1(self.fc1(s))))))
        return x * s


@register_notrace_module  # sizes its position embeddings from the input shape
class GccBlock(nn.Module):
    """Meta-former block with global circular convolutions as token mixer (``gcc_ca`` in the original).

    Channels split in two halves: branch A mixes vertically then horizontally, branch B horizontally then
    vertically. The first block of a stage adds position embeddings: before each branch's norm (oriented
    along the branch's first axis) and between its two convolutions (oriented along the second axis).
    The channel mixer is a BN + 1x1 MLP whose output is gated by squeeze-excitation before the residual."""

    def __init__(
            self,
            dim: int,
            mlp_hidden_dim: int,
            meta_size: int,
            use_pos_embed: bool = False,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        half = dim // 2
        self.gcc_a1 = GlobalCircularConv(half, meta_size, vertical=True, **dd)
        self.gcc_a2 = GlobalCircularConv(half, meta_size, vertical=False, **dd)
        self.gcc_b1 = GlobalCircularConv(half, meta_size, vertical=False, **dd)
        self.gcc_b2 = GlobalCircularConv(half, meta_size, vertical=True, **dd)
        if use_pos_embed:
            column, row = (1, half, meta_size, 1), (1, half, 1, meta_size)
            self.pos_embed_a1 = nn.Parameter(torch.randn(column, **dd))
            self.pos_embed_a2 = nn.Parameter(torch.randn(row, **dd))
            self.pos_embed_b1 = nn.Parameter(torch.randn(row, **dd))
            self.pos_embed_b2 = nn.Parameter(torch.randn(column, **dd))
        else:
            self.pos_embed_a1 = self.pos_embed_a2 = self.pos_embed_b1 = self.pos_embed_b2 = None
        self.norm_a = norm_layer(half, **dd)
        self.norm_b = norm_layer(half, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

        self.norm_mlp = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, mlp_hidden_dim, act_layer=nn.Hardswish, drop=(0., proj_drop), use_conv=True, **dd)
        self.se = SqueezeExcite(dim, dim // 16, norm_layer=norm_layer, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def _token_mix(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        h, w = x.shape[2], x.shape[3]
        if self.pos_embed_a1 is not None:
            a = a + _resize_along(self.pos_embed_a1, h, 2)
            b = b + _resize_along(self.pos_embed_b1, w, 3)
        a = self.gcc_a1(self.norm_a(a))
        b = self.gcc_b1(self.norm_b(b))
        if self.pos_embed_a2 is not None:
            a = a + _resize_along(self.pos_embed_a2, w, 3)
            b = b + _resize_along(self.pos_embed_b2, h, 2)
        return torch.cat([self.gcc_a2(a), self.gcc_b2(b)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self._token_mix(x))
        x = x + self.drop_path2(self.se(self.mlp(self.norm_mlp(x))))
        return x


class GccStage(nn.Module):
    """Global stage body (``outer_frame_v1``): grouped adapter to the GCC width, GCC blocks, a trailing BN,
    grouped projection back, then fusion with the stage input by a 3x3 conv over [global, local] (concat)
    or over their sum (add). There is no residual around it."""

    def __init__(
            self,
            dim: int,
            inner_dim: int,
            mlp_hidden_dim: int,
            depth: int,
            meta_size: int,
            fusion: str = "concat",
            proj_drop: float = 0.,
            drop_path: Union[float, List[float]] = 0.,
            act_layer: Type[nn.Module] = nn.SiLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            device=None,
            dtype=None,
    ) -> None:
        dd = {"device": device, "dtype": dtype}
        super().__init__()
        if fusion not in ("concat", "add"):
            raise ValueError(f"fusion must be 'concat' or 'add', got {fusion!r}")
        self.fusion = fusion
        groups = math.gcd(inner_dim, dim)
        drop_path = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.conv_in = ConvNormAct(dim, inner_dim, 3, groups=groups, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self.proj_in = nn.Conv2d(inner_dim, inner_dim, 1, bias=False, **dd)
        self.blocks = nn.Sequential(*[
            GccBlock(inner_dim, mlp_hidden_dim, meta_size, use_pos_embed=i == 0, proj_drop=proj_drop,
                     drop_path=drop_path[i], norm_layer=norm_layer, **dd)
            for i in range(depth)
        ])
        self.norm = norm_layer(inner_dim, **dd)
        self.proj_out = ConvNormAct(inner_dim, dim, 1, groups=groups, norm_layer=norm_layer, act_layer=act_layer, **dd)
        fuse_in = 2 * dim if fusion == "concat" else dim
        # not named `fuse`: timm's reparameterize_model calls any child attribute of that name
        self.merge = ConvNormAct(fuse_in, dim, 3, norm_layer=norm_layer, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.blocks(self.proj_in(self.conv_in(x))))
        y = self.proj_out(y)
        y = torch.cat([y, x], dim=1) if self.fusion == "concat" else y + x
        return self.merge(y)


class EdgeFormer(ClassifierHeadModel):
    """EdgeFormer / ParC-Net classifier.

    Stem conv (stride 2), two stages of MobileNetV2 inverted residuals (strides 2 and 4), three global
    stages (strides 8, 16, 32) each made of a stride-2 inverted residual and a :class:`GccStage`, a 1x1
    expansion conv (``final_conv``, part of ``forward_features`` as in timm's MobileViT), average pooling
    and a linear classifier.
    """

    norm_name = "final_conv"
    norm_taps = False  # the final conv widens the map

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (32, 64, 96, 128, 160),
            mv2_depths: Tuple[int, int] = (1, 3),
            gcc_dims: Tuple[int, int, int] = (192, 256, 320),
            mlp_hidden_dims: Tuple[int, int, int] = (384, 512, 640),
            gcc_depths: Tuple[int, int, int] = (2, 4, 3),
            meta_sizes: Tuple[int, int, int] = (32, 16, 8),
            fusion: str = "concat",
            stem_chs: int = 16,
            stem_kernel_size: int = 3,
            exp_ratio: float = 4.,
            num_features: Optional[int] = None,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.2,
            proj_drop_rate: float = 0.1,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.SiLU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            output_stride: int = 32,
            stride2_feature: bool = False,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            embed_dims: output width of the five stages (strides 2, 4, 8, 16, 32).
            mv2_depths: inverted residuals in the first two stages (the second starts with stride 2).
            gcc_dims: width inside the GCC part of each global stage (Cs); each branch gets half.
            mlp_hidden_dims: absolute hidden width of the GCC blocks' MLP per global stage.
            gcc_depths: GCC blocks per global stage.
            meta_sizes: stored length of circular kernels and position embeddings per global stage (the
                feature side at a 256x256 input); resampled to the actual side at run time.
            fusion: 'concat' (S, H) or 'add' (XS): how a global stage fuses its output with its input.
            stem_chs, stem_kernel_size: stem conv (stride 2) width and kernel.
            exp_ratio: expansion of every inverted residual.
            num_features: width of the final 1x1 conv; default min(4 * embed_dims[-1], 960) as the original.
            drop_rate: dropout before the classifier (the original recipe's 0.2).
            proj_drop_rate: dropout after the GCC blocks' MLP (the original recipe's 0.1).
            drop_path_rate: stochastic depth, rising linearly over blocks (not in the original; off by default).
            output_stride: 16 or 8 make the last stages keep the resolution with dilated convs (DeepLabv3's
                setting: layer5's downsampling becomes stride 1); circular kernels follow the larger maps.
            stride2_feature: list the stride-2 stage (``layer_1``) as feature 0, in front of strides 4-32.
        """
        check_output_stride("EdgeFormer", output_stride, (8, 16, 32))
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.drop_rate = drop_rate

        self.stem = ConvNormAct(in_chans, stem_chs, stem_kernel_size, stride=2, norm_layer=norm_layer,
                                act_layer=act_layer, **dd)
        block_counts = list(mv2_depths) + [1 + d for d in gcc_depths]
        dpr = calculate_drop_path_rates(drop_path_rate, block_counts, stagewise=True)
        ir_args = dict(exp_ratio=exp_ratio, act_layer=act_layer, norm_layer=norm_layer, **dd)

        stages = []
        in_chs, reduction = stem_chs, 2
        for i, (width, depth) in enumerate(zip(embed_dims[:2], mv2_depths)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(depth):
                blocks.append(InvertedResidual(in_chs, width, stride=stride if j == 0 else 1,
                                               drop_path_rate=dpr[i][j], **ir_args))
                in_chs = width
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{i}"))
        for i, width in enumerate(embed_dims[2:]):
            stage_idx = i + 2
            transition = InvertedResidual(in_chs, width, stride=2, drop_path_rate=dpr[stage_idx][0], **ir_args)
            body = GccStage(width, gcc_dims[i], mlp_hidden_dims[i], gcc_depths[i], meta_sizes[i], fusion=fusion,
                            proj_drop=proj_drop_rate, drop_path=dpr[stage_idx][1:], act_layer=act_layer,
                            norm_layer=norm_layer, **dd)
            in_chs, reduction = width, reduction * 2
            stages.append(nn.Sequential(transition, body))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        dilate_stages(self.stages, self.feature_info, output_stride)
        self.feature_info, skipped = select_taps(self.feature_info, stride2_feature)
        self.first_tap = 1 + skipped  # the stem is no tap; the stride-2 stage only with stride2_feature

        num_features = num_features or min(4 * in_chs, 960)
        self.final_conv = ConvNormAct(in_chs, num_features, 1, norm_layer=norm_layer, act_layer=act_layer, **dd)
        self._init_head(num_features, num_classes, global_pool, drop_rate, **dd)

        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """The original's init: Kaiming-normal (fan-out) convs, truncated-normal linear; circular kernels
        and position embeddings keep their own init."""
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.(\d+)", None), (r"^final_conv", (99999,))])

    def forward_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)


# original key fragment -> ours, applied in order; cvnets' ConvLayer internals (block.conv / block.norm)
# become ConvNormAct's (conv / bn) last
_KEY_MAP = [
    (r"^conv_1\.", "stem."),
    (r"^layer_(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}."),
    (r"\.block\.exp_1x1\.block\.conv\.", ".conv_pw."),
    (r"\.block\.exp_1x1\.block\.norm\.", ".bn1."),
    (r"\.block\.conv_3x3\.block\.conv\.", ".conv_dw."),
    (r"\.block\.conv_3x3\.block\.norm\.", ".bn2."),
    (r"\.block\.red_1x1\.block\.conv\.", ".conv_pwl."),
    (r"\.block\.red_1x1\.block\.norm\.", ".bn3."),
    (r"\.dim_adaptive\.0\.", ".conv_in."),
    (r"\.dim_adaptive\.1\.block\.conv\.", ".proj_in."),
    (r"\.channel_adaptive\.", ".proj_out."),
    (r"\.local_global_fusion\.", ".merge."),
    # the BN after the last GCC block is an entry of the same list, holding its tensors directly
    (r"\.spatial_global_rep\.\d+\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r".norm.\1"),
    (r"\.spatial_global_rep\.", ".blocks."),
    (r"\.meta_kernel_1_H$", ".gcc_a1.weight"),
    (r"\.meta_kernel_2_W$", ".gcc_a2.weight"),
    (r"\.meta_kernel_1_W$", ".gcc_b1.weight"),
    (r"\.meta_kernel_2_H$", ".gcc_b2.weight"),
    (r"\.meta_pe_1_H$", ".pos_embed_a1"),
    (r"\.meta_pe_2_W$", ".pos_embed_a2"),
    (r"\.meta_pe_1_W$", ".pos_embed_b1"),
    (r"\.meta_pe_2_H$", ".pos_embed_b2"),
    (r"\.pre_Norm_1\.", ".norm_a."),
    (r"\.pre_Norm_2\.", ".norm_b."),
    (r"\.ffn\.0\.", ".norm_mlp."),
    (r"\.ffn\.1\.", ".mlp.fc1."),
    (r"\.ffn\.4\.", ".mlp.fc2."),
    (r"\.ca\.fc\.0\.", ".se.fc1."),
    (r"\.ca\.fc\.1\.", ".se.bn1."),
    (r"\.ca\.fc\.3\.", ".se.fc2."),
    (r"\.ca\.fc\.4\.", ".se.bn2."),
    (r"^conv_1x1_exp\.", "final_conv."),
    (r"^classifier\.fc\.", "head.fc."),
    (r"\.block\.norm\.", ".bn."),
    (r"\.block\.conv\.", ".conv."),
]
_KEY_MAP = [(re.compile(p), r) for p, r in _KEY_MAP]


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map the original EdgeFormer keys (cvnets layout, as in the released ``checkpoint_ema_avg.pt``).

    The original network also exposes its last transition block as an attribute ``residual``, so its state
    dict carries ``residual.*`` copies of ``layer_5.0.*``; PyTorch loads ``layer_5.0.*`` last, so those
    win and the ``residual.*`` entries are dropped here."""
    if "stem.conv.weight" in state_dict:
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key.startswith("residual."):
            continue
        for pattern, repl in _KEY_MAP:
            key = pattern.sub(repl, key)
        out[key] = value
    return out


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 256, 256), "pool_size": (8, 8),
        "crop_pct": 256 / 288, "interpolation": "bilinear",  # eval: shorter side to 288, centre crop 256
        "mean": (0., 0., 0.), "std": (1., 1., 1.),
        "first_conv": "stem.conv", "classifier": "head.fc",
        "origin_url": "https://github.com/hkzhang91/EdgeFormer", "paper_ids": "arXiv:2203.03952",
        "paper_name": "EdgeFormer: Improving Light-weight ConvNets by Learning from Vision Transformers",
        "notes": (BGR_INPUT_NOTE, "values in [0, 1] without mean/std, as the original reads images with OpenCV"),
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "edgeformer_xs.untrained": _cfg(),
    "edgeformer_s.untrained": _cfg(),
    "edgeformer_h.untrained": _cfg(),
})


def _create_edgeformer(variant: str, pretrained: bool = False, **kwargs: Any) -> EdgeFormer:
    return build_model_with_cfg(
        EdgeFormer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=default_out_indices(kwargs), feature_cls="getter"),
        **kwargs,
    )


@record()
@register_model
def edgeformer_xs(pretrained: bool = False, **kwargs: Any) -> EdgeFormer:
    """EdgeFormer-XS (2.2M params): narrow GCC part, add fusion."""
    model_args = dict(
        embed_dims=(32, 64, 96, 128, 160), gcc_dims=(96, 128, 160), mlp_hidden_dims=(192, 256, 320),
        gcc_depths=(2, 3, 2), fusion="add",
    )
    return _create_edgeformer("edgeformer_xs", pretrained=pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def edgeformer_s(pretrained: bool = False, **kwargs: Any) -> EdgeFormer:
    """EdgeFormer-S (5.0M params, 78.6% ImageNet top-1 in the paper)."""
    model_args = dict(
        embed_dims=(32, 64, 96, 128, 160), gcc_dims=(192, 256, 320), mlp_hidden_dims=(384, 512, 640),
        gcc_depths=(2, 4, 3), fusion="concat",
    )
    return _create_edgeformer("edgeformer_s", pretrained=pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def edgeformer_h(pretrained: bool = False, **kwargs: Any) -> EdgeFormer:
    """EdgeFormer-H (20.4M params): 5x5 stem, wider and deeper."""
    model_args = dict(
        embed_dims=(96, 144, 216, 288, 432), gcc_dims=(324, 432, 432), mlp_hidden_dims=(648, 864, 864),
        gcc_depths=(3, 9, 3), fusion="concat", stem_chs=48, stem_kernel_size=5,
    )
    return _create_edgeformer("edgeformer_h", pretrained=pretrained, **dict(model_args, **kwargs))
