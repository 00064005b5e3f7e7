""" Inception Transformer (iFormer, Si et al. 2022)

Paper: `Inception Transformer` - https://arxiv.org/abs/2205.12956 (NeurIPS 2022)

Original code: https://github.com/sail-sg/iFormer (vendored in LowFormer as `other_models/inceptionFormer.py`)

@inproceedings{si2022inception,
  title={Inception Transformer},
  author={Si, Chenyang and Yu, Weihao and Zhou, Pan and Zhou, Yichen and Wang, Xinchao and Yan, Shuicheng},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}

Written for lowformer in timm's model-file layout. Named `inception_transformer_*` because timm's
`iformer_*` is a different network (Zheng, "iFormer: Integrating ConvNet and Transformer for Mobile
Application", ICLR 2025). The per-stage absolute position tables are stored for the construction grid
(`img_size` / 4, 8, 16, 32) and resized bilinearly (align_corners False, no antialias) for other inputs,
as the original does. The original runs square inputs with a side divisible by 16 only; here any size
works (the attention's 2x2 average pool rounds up and its upsampling returns to the exact map size),
with identical results wherever the original runs.
"""
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import (
    DropPath,
    LayerNorm2d,
    LayerScale,
    Mlp,
    calculate_drop_path_rates,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed_nhwc,
    to_2tuple,
    trunc_normal_,
    use_fused_attn,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from lowformer.models._api import StagedModel
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import Stage, featured_cfg, map_self_attention

__all__ = ['InceptionTransformer']


@register_notrace_function  # shape-dependent: torch.fx keeps it as one call
def resize_pos_table(table: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A (1, H, W, C) position table at another grid size: bilinear, align_corners False, no antialias
    (the original's resize), returned unchanged when the size already matches."""
    return resample_abs_pos_embed_nhwc(table, list(size), interpolation='bilinear', antialias=False, verbose=False)


class Stem(nn.Module):
    """Two 3x3 stride-2 Conv-BN (GELU between them): output at 1/4."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, stride=2, padding=1, **dd)
        self.bn1 = nn.BatchNorm2d(out_chs // 2, **dd)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, stride=2, padding=1, **dd)
        self.bn2 = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class Downsample(nn.Module):
    """3x3 stride-2 Conv-BN between stages."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class HighMixer(nn.Module):
    """High-frequency paths: the first half of the channels through 1x1 (x2 channels) -> 3x3 depthwise
    -> GELU, the second half through 3x3 max-pool -> 1x1 (x2 channels) -> GELU."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv_in = dim // 2
        pool_in = dim - self.conv_in
        self.conv_pw = nn.Conv2d(self.conv_in, self.conv_in * 2, 1, bias=False, **dd)
        self.conv_dw = nn.Conv2d(
            self.conv_in * 2, self.conv_in * 2, 3, padding=1, groups=self.conv_in * 2, bias=False, **dd)
        self.act1 = nn.GELU()
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.pool_proj = nn.Conv2d(pool_in, pool_in * 2, 1, **dd)
        self.act2 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cx, px = x[:, :self.conv_in], x[:, self.conv_in:]
        cx = self.act1(self.conv_dw(self.conv_pw(cx)))
        px = self.act2(self.pool_proj(self.pool(px)))
        return torch.cat((cx, px), dim=1)


@register_notrace_module  # its upsampling depends on the map size
class LowMixer(nn.Module):
    """Low-frequency path: multi-head self-attention, on a 2x2 average-pooled map in stages 1-2, then
    nearest upsampling back to the map size."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            pool_size: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.pool = nn.AvgPool2d(pool_size, pool_size, ceil_mode=True, count_include_pad=False) \
            if pool_size > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        xa = self.pool(x)
        h, w = xa.shape[2], xa.shape[3]
        xa = map_self_attention(self.qkv(xa.flatten(2).transpose(1, 2)), self.num_heads, self.fused_attn,
                                self.attn_drop.p if self.training else 0.)
        # (B, heads, N, d) -> (B, heads * d, h, w): channel = head * d + d_index, as the original
        xa = xa.transpose(2, 3).reshape(B, C, h, w)
        if (h, w) != (H, W):
            xa = F.interpolate(xa, size=(H, W), mode='nearest')
        return xa


class InceptionMixer(nn.Module):
    """Split channels into high (first) and low (last, `attention_heads` x head width) frequency parts,
    mix them, concatenate [conv, pool, attention], add a 3x3 depthwise conv of the result, project to C."""

    def __init__(
            self,
            dim: int,
            head_dim: int,
            attention_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pool_size: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        low_dim = attention_heads * head_dim
        self.high_dim = dim - low_dim
        fuse_dim = low_dim + self.high_dim * 2
        self.high_mixer = HighMixer(self.high_dim, **dd)
        self.low_mixer = LowMixer(
            low_dim, num_heads=attention_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, pool_size=pool_size, **dd)
        self.conv_fuse = nn.Conv2d(fuse_dim, fuse_dim, 3, padding=1, groups=fuse_dim, bias=False, **dd)
        self.proj = nn.Conv2d(fuse_dim, dim, 1, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        x = x.permute(0, 3, 1, 2)
        x = torch.cat((self.high_mixer(x[:, :self.high_dim]), self.low_mixer(x[:, self.high_dim:])), dim=1)
        x = x + self.conv_fuse(x)
        x = self.proj_drop(self.proj(x))
        return x.permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm inception mixer and MLP on a channels-last map, optional layer scale."""

    def __init__(
            self,
            dim: int,
            head_dim: int,
            attention_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            pool_size: int = 1,
            layer_scale_init_value: Optional[float] = None,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = norm_layer(dim, **dd)
        self.mixer = InceptionMixer(
            dim, head_dim, attention_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, pool_size=pool_size, **dd)
        self.ls1 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls2 = LayerScale(dim, layer_scale_init_value, **dd) if layer_scale_init_value else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.mixer(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


class InceptionTransformerStage(Stage):
    """Downsample (NCHW), add the stage's position table (resized to the map), blocks (channels last)."""

    def __init__(self, downsample: Optional[nn.Module], dim: int, grid_size: Tuple[int, int],
                 blocks: List[nn.Module], device=None, dtype=None):
        super().__init__(blocks, downsample)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_size[0], grid_size[1], dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x).permute(0, 2, 3, 1)
        x = x + resize_pos_table(self.pos_embed, (x.shape[1], x.shape[2]))
        return self.blocks(x).permute(0, 3, 1, 2)


class InceptionTransformer(StagedModel):
    """Inception Transformer: conv stem, four stages of inception-mixer blocks with absolute position
    tables; the head normalises every position (LayerNorm over channels) before it averages them."""

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (96, 192, 320, 384),
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            attention_heads: Sequence[int] = (1,) * 3 + (3,) * 3 + (7,) * 4 + (9,) * 5 + (11,) * 3,
            head_dim: int = 32,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            layer_scale_init_value: float = 1e-6,
            layer_scale_stages: Tuple[int, ...] = (2, 3),
            pool_stages: Tuple[int, ...] = (0, 1),
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dims: Width of each stage.
            depths: Blocks per stage.
            attention_heads: Attention heads of every block, in order (the low-frequency part of a block
                has attention_heads x head_dim channels, the rest is high-frequency).
            head_dim: Attention head width (the original's width // num_heads, 32 in every variant).
            mlp_ratio: MLP expansion.
            qkv_bias: Bias in the attention's qkv projection.
            layer_scale_init_value: Layer-scale init in the stages listed in `layer_scale_stages`.
            layer_scale_stages: Stages (0-based) whose blocks have layer scale (the original: 3 and 4).
            pool_stages: Stages whose attention runs on a 2x2 average-pooled map.
            img_size: Grid the position tables are stored for (224 or 384 in the original); other inputs
                resize them.
            in_chans: Input image channels.
            num_classes: Classifier classes.
            global_pool: 'avg' or '' (no pooling).
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout after the mixer and MLP projections.
            attn_drop_rate: Dropout on attention weights.
            drop_path_rate: Stochastic depth, rising linearly over all blocks.
            act_layer: MLP activation.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert len(attention_heads) == sum(depths), 'attention_heads needs one entry per block'
        self.in_chans = in_chans
        img_size = to_2tuple(img_size)

        self.stem = Stem(in_chans, embed_dims[0], **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages = []
        for i, depth in enumerate(depths):
            reduction = 4 * 2 ** i
            start = sum(depths[:i])
            blocks = [
                Block(
                    embed_dims[i], head_dim, attention_heads[start + j], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    pool_size=2 if i in pool_stages else 1,
                    layer_scale_init_value=layer_scale_init_value if i in layer_scale_stages else None,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[start + j],
                    act_layer=act_layer, **dd)
                for j in range(depth)]
            downsample = None if i == 0 else Downsample(embed_dims[i - 1], embed_dims[i], **dd)
            grid = (img_size[0] // reduction, img_size[1] // reduction)
            stages.append(InceptionTransformerStage(downsample, embed_dims[i], grid, blocks, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.norm = LayerNorm2d(embed_dims[-1], eps=1e-6, **dd)
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate, **dd)
        self.init_weights()

    def init_weights(self) -> None:
        for stage in self.stages:
            trunc_normal_(stage.pos_embed, std=.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {f'stages.{i}.pos_embed' for i in range(len(self.stages))}


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: InceptionTransformer) -> Dict[str, torch.Tensor]:
    """Map the original layout (`patch_embedN`, `pos_embedN`, `blocksN`, `attn.high_mixer.conv1`, ...)
    onto this one; position tables stored for another grid (the `_384` checkpoints) are resized."""
    if 'stem.conv1.weight' not in state_dict:
        state_dict = {_remap_key(k): v for k, v in state_dict.items()}
    own = dict(model.named_parameters())
    out = {}
    for k, v in state_dict.items():
        if k.endswith('.pos_embed') and k in own and v.shape != own[k].shape:
            v = resize_pos_table(v, own[k].shape[1:3])
        out[k] = v
    return out


def _remap_key(k: str) -> str:
    k = k.replace('patch_embed.proj1.', 'stem.conv1.').replace('patch_embed.norm1.', 'stem.bn1.')
    k = k.replace('patch_embed.proj2.', 'stem.conv2.').replace('patch_embed.norm2.', 'stem.bn2.')
    for i in range(4):
        k = k.replace(f'patch_embed{i + 1}.proj.', f'stages.{i}.downsample.conv.')
        k = k.replace(f'patch_embed{i + 1}.norm.', f'stages.{i}.downsample.bn.')
        k = k.replace(f'pos_embed{i + 1}', f'stages.{i}.pos_embed')
        k = k.replace(f'blocks{i + 1}.', f'stages.{i}.blocks.')
    k = k.replace('.attn.', '.mixer.')
    k = k.replace('.high_mixer.conv1.', '.high_mixer.conv_pw.').replace('.high_mixer.proj1.', '.high_mixer.conv_dw.')
    k = k.replace('.high_mixer.proj2.', '.high_mixer.pool_proj.')
    k = k.replace('.layer_scale_1', '.ls1.gamma').replace('.layer_scale_2', '.ls2.gamma')
    return k


_cfg = partial(
    featured_cfg, first_conv='stem.conv1', origin_url='https://github.com/sail-sg/iFormer', license='apache-2.0')

default_cfgs = generate_default_cfgs({
    'inception_transformer_small.untrained': _cfg(),
    'inception_transformer_base.untrained': _cfg(),
    'inception_transformer_large.untrained': _cfg(),
    'inception_transformer_small_384.untrained': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'inception_transformer_base_384.untrained': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
    'inception_transformer_large_384.untrained': _cfg(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


def _create_inception_transformer(variant: str, pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    check_output_stride("Inception Transformer", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        InceptionTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


# widths, depths and per-block attention heads of the three sizes (head width 32 throughout)
_SMALL = dict(embed_dims=(96, 192, 320, 384), depths=(3, 3, 9, 3),
              attention_heads=(1,) * 3 + (3,) * 3 + (7,) * 4 + (9,) * 5 + (11,) * 3)
_BASE = dict(embed_dims=(96, 192, 384, 512), depths=(4, 6, 14, 6),
             attention_heads=(1,) * 4 + (3,) * 6 + (8,) * 7 + (10,) * 7 + (15,) * 6)
_LARGE = dict(embed_dims=(96, 192, 448, 640), depths=(4, 6, 18, 8),
              attention_heads=(1,) * 4 + (3,) * 6 + (10,) * 9 + (12,) * 9 + (19,) * 8)


# aliases: the original's `--other` names; `iformers` is the (broken in the original) spelling of its featured list
@record(aliases=('iformers', 'iformersmall'))
@register_model
def inception_transformer_small(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer small (iFormer-S), 19.87 M params."""
    return _create_inception_transformer('inception_transformer_small', pretrained, **dict(_SMALL, **kwargs))


@record(aliases=('iformerbase',))
@register_model
def inception_transformer_base(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer base (iFormer-B), 47.87 M params."""
    return _create_inception_transformer('inception_transformer_base', pretrained, **dict(_BASE, **kwargs))


@record(aliases=('iformerlarge',))
@register_model
def inception_transformer_large(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer large (iFormer-L)."""
    return _create_inception_transformer('inception_transformer_large', pretrained, **dict(_LARGE, **kwargs))


@record(aliases=('iformersmall_384',))
@register_model
def inception_transformer_small_384(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer small with position tables for 384x384."""
    return _create_inception_transformer(
        'inception_transformer_small_384', pretrained, **dict(dict(_SMALL, img_size=384), **kwargs))


@record(aliases=('iformerbase_384',))
@register_model
def inception_transformer_base_384(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer base with position tables for 384x384."""
    return _create_inception_transformer(
        'inception_transformer_base_384', pretrained, **dict(dict(_BASE, img_size=384), **kwargs))


@record(aliases=('iformerlarge_384',))
@register_model
def inception_transformer_large_384(pretrained: bool = False, **kwargs: Any) -> InceptionTransformer:
    """Inception Transformer large with position tables for 384x384."""
    return _create_inception_transformer(
        'inception_transformer_large_384', pretrained, **dict(dict(_LARGE, img_size=384), **kwargs))
