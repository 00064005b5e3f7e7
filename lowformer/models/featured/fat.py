""" FAT (Fully Adaptive Transformer)

Paper: `Lightweight Vision Transformer with Bidirectional Interaction`
    - https://arxiv.org/abs/2306.00396 (NeurIPS 2023)

Original code: https://github.com/qhfan/FAT (vendored in LowFormer as `other_models/FAT.py` with yacs
configs `fat_configs/FAT_b*.yaml`; the configurations live in the factories below instead)

@inproceedings{fan2023fat,
  title={Lightweight Vision Transformer with Bidirectional Interaction},
  author={Fan, Qihang and Huang, Huaibo and Zhou, Xiaoqiang and He, Ran},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2023}
}

Written for lowformer in timm's model-file layout. FAT downsamples inside the last block of stages 1-3,
so the stage outputs sit at strides 8/16/32/32 and the only stride-4 map is the stem's: `feature_info`
lists all five taps and `features_only` takes one map per stride by default (stem, stages 1, 2 and 4).
"""
import math
from functools import partial
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ConvNormAct, DropPath, calculate_drop_path_rates, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from lowformer.models._api import StagedModel, init_linear
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import Stage, featured_cfg

__all__ = ['FAT']


def _dw_conv(dim: int, kernel_size: int, stride: int = 1, **dd: Any) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, kernel_size, stride, kernel_size // 2, groups=dim, **dd)


class Stem(nn.Module):
    """Two stride-2 and two stride-1 3x3 Conv-BN-ReLU, a 1x1 conv and GroupNorm(1): output at 1/4."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.conv1 = ConvNormAct(in_chs, out_chs // 2, 3, stride=2, bias=True, act_layer=nn.ReLU, **dd)
        self.conv2 = ConvNormAct(out_chs // 2, out_chs, 3, stride=2, bias=True, act_layer=nn.ReLU, **dd)
        self.conv3 = ConvNormAct(out_chs, out_chs, 3, bias=True, act_layer=nn.ReLU, **dd)
        self.conv4 = ConvNormAct(out_chs, out_chs, 3, bias=True, act_layer=nn.ReLU, **dd)
        self.proj = nn.Conv2d(out_chs, out_chs, 1, **dd)
        self.norm = nn.GroupNorm(1, out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv4(self.conv3(self.conv2(self.conv1(x))))
        return self.norm(self.proj(x))


class FASA(nn.Module):
    """Fully adaptive self-attention: global attention of every query on a learned, pooled copy of the map,
    a self-gated local depthwise branch, and a bidirectional-interaction gate (only the local branch is
    gated, by sigmoid of the global one) before the output 1x1."""
    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, kernel_size: int, num_heads: int, pool_factor: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = nn.Conv2d(dim, dim, 1, **dd)
        self.kv = nn.Conv2d(dim, dim * 2, 1, **dd)
        self.local_mixer = _dw_conv(dim, kernel_size, **dd)
        self.mixer = nn.Conv2d(dim, dim, 1, **dd)
        # log2(pool_factor) stride-2 5x5 depthwise Conv-BN, with 1x1 convs between them
        num_down = int(math.log2(pool_factor))
        pool = nn.Sequential()
        for i in range(num_down):
            pool.add_module(f'conv{i}', _dw_conv(dim, 5, 2, **dd))
            pool.add_module(f'bn{i}', nn.BatchNorm2d(dim, **dd))
            if i != num_down - 1:
                pool.add_module(f'linear{i}', nn.Conv2d(dim, dim, 1, **dd))
        self.pool = pool if num_down else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q_local = self.q(x)
        q = q_local.reshape(B, -1, self.head_dim, H * W).transpose(-1, -2)
        kv = self.kv(self.pool(x))
        k, v = kv.reshape(B, 2, -1, self.head_dim, kv.shape[-2] * kv.shape[-1]).transpose(-1, -2).unbind(1)
        if self.fused_attn:
            global_feat = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            global_feat = torch.softmax(self.scale * q @ k.transpose(-1, -2), -1) @ v
        global_feat = global_feat.transpose(-1, -2).reshape(B, C, H, W)
        local_feat = self.local_mixer(q_local)
        local_feat = local_feat * torch.sigmoid(local_feat) * torch.sigmoid(global_feat)
        return self.mixer(local_feat * global_feat)


class ConvFFN(nn.Module):
    """1x1 expand, GELU, depthwise conv (residual, or stride 2 without residual when downsampling), BN,
    1x1 to the output width."""

    def __init__(self, in_chs: int, hidden_chs: int, kernel_size: int, stride: int, out_chs: int,
                 device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.stride = stride
        self.fc1 = nn.Conv2d(in_chs, hidden_chs, 1, **dd)
        self.act = nn.GELU()
        self.dwconv = _dw_conv(hidden_chs, kernel_size, stride, **dd)
        self.bn = nn.BatchNorm2d(hidden_chs, **dd)
        self.fc2 = nn.Conv2d(hidden_chs, out_chs, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = x + self.dwconv(x) if self.stride == 1 else self.dwconv(x)
        return self.fc2(self.bn(x))


class FATBlock(nn.Module):
    """Conv position encoding, pre-GroupNorm FASA, pre-GroupNorm ConvFFN; a stride-2 block replaces the
    FFN's identity shortcut with a depthwise Conv-BN + 1x1 projection."""

    def __init__(
            self,
            dim: int,
            out_dim: int,
            kernel_size: int,
            num_heads: int,
            pool_factor: int,
            mlp_kernel_size: int,
            mlp_ratio: float,
            stride: int,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.cpe = _dw_conv(dim, kernel_size, **dd)
        self.norm1 = nn.GroupNorm(1, dim, **dd)
        self.attn = FASA(dim, kernel_size, num_heads, pool_factor, **dd)
        self.norm2 = nn.GroupNorm(1, dim, **dd)
        if stride == 1:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                _dw_conv(dim, mlp_kernel_size, stride, **dd),
                nn.BatchNorm2d(dim, **dd),
                nn.Conv2d(dim, out_dim, 1, **dd),
            )
        self.ffn = ConvFFN(dim, int(dim * mlp_ratio), mlp_kernel_size, stride, out_dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.cpe(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self.downsample(x) + self.drop_path(self.ffn(self.norm2(x)))


class FAT(StagedModel):
    """FAT: conv stem, four stages of FAT blocks (the last block of stages 1-3 halves the resolution and
    widens to the next stage), GroupNorm(1) head."""

    def __init__(
            self,
            embed_dims: Tuple[int, ...] = (32, 80, 160, 256),
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            num_heads: Tuple[int, ...] = (2, 5, 10, 16),
            kernel_sizes: Tuple[int, ...] = (3, 5, 7, 9),
            pool_factors: Tuple[int, ...] = (8, 4, 2, 1),
            mlp_kernel_sizes: Tuple[int, ...] = (5, 5, 5, 5),
            mlp_ratios: Tuple[float, ...] = (4, 4, 4, 4),
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dims: Width of each stage (stages 1-3 end at the next stage's width).
            depths: Blocks per stage.
            num_heads: Attention heads per stage.
            kernel_sizes: Depthwise kernel of the position encoding and the local branch, per stage.
            pool_factors: Down-sampling of the keys/values per stage (the original's `window_sizes`),
                a power of two.
            mlp_kernel_sizes: Depthwise kernel of the ConvFFN and of the downsampling shortcut.
            mlp_ratios: ConvFFN expansion.
            in_chans: Input image channels.
            num_classes: Classifier classes.
            global_pool: 'avg' or '' (no pooling).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth, rising linearly over all blocks.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans

        self.stem = Stem(in_chans, embed_dims[0], **dd)
        self.feature_info = [dict(num_chs=embed_dims[0], reduction=4, module='stem')]
        self.first_tap = 0  # the stem is the only map at stride 4
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        num_stages = len(depths)
        stages = []
        reduction = 4
        for i in range(num_stages):
            dim = embed_dims[i]
            last = i == num_stages - 1
            out_dim = dim if last else embed_dims[i + 1]
            start = sum(depths[:i])
            blocks = [
                FATBlock(
                    dim, out_dim if j == depths[i] - 1 else dim, kernel_sizes[i], num_heads[i], pool_factors[i],
                    mlp_kernel_sizes[i], mlp_ratios[i], stride=2 if (j == depths[i] - 1 and not last) else 1,
                    drop_path=dpr[start + j], **dd)
                for j in range(depths[i])]
            stages.append(Stage(blocks))
            reduction = reduction if last else reduction * 2
            self.feature_info.append(dict(num_chs=out_dim, reduction=reduction, module=f'stages.{i}'))
        self.stages = nn.Sequential(*stages)

        self.norm = nn.GroupNorm(1, embed_dims[-1], **dd)
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate, **dd)
        self.apply(init_linear)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map the original FAT layout (`patch_embed.convN.conv.{0,1}`, `layers.N`) onto this one."""
    if 'stem.proj.weight' in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        if k.startswith('patch_embed.'):
            k = k.replace('patch_embed.', 'stem.', 1)
            k = k.replace('.conv.0.', '.conv.').replace('.conv.1.', '.bn.')
            k = k.replace('stem.conv5.', 'stem.proj.').replace('stem.layernorm.', 'stem.norm.')
        k = k.replace('layers.', 'stages.', 1) if k.startswith('layers.') else k
        out[k] = v
    return out


_cfg = partial(featured_cfg, first_conv='stem.conv1.conv', origin_url='https://github.com/qhfan/FAT', license='mit')

default_cfgs = generate_default_cfgs({
    'fat_b0.untrained': _cfg(),
    'fat_b1.untrained': _cfg(),
    'fat_b2.untrained': _cfg(),
    'fat_b3.untrained': _cfg(),
})


def _create_fat(variant: str, pretrained: bool = False, **kwargs: Any) -> FAT:
    check_output_stride("FAT", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        FAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # one map per stride: stem (4), stages 1 and 2 (8, 16) and the last stage (32)
        feature_cfg=dict(out_indices=(0, 1, 2, 4), flatten_sequential=True),
        **kwargs,
    )


# aliases: `FATb*` is what the original dispatcher accepts; `fatb0` is the spelling in its featured list
@record(aliases=('FATb0', 'fatb0'))
@register_model
def fat_b0(pretrained: bool = False, **kwargs: Any) -> FAT:
    """FAT-B0, 4.49 M params."""
    model_args = dict(embed_dims=(32, 80, 160, 256), depths=(2, 2, 6, 2), num_heads=(2, 5, 10, 16))
    return _create_fat('fat_b0', pretrained=pretrained, **dict(model_args, **kwargs))


@record(aliases=('FATb1', 'fatb1'))
@register_model
def fat_b1(pretrained: bool = False, **kwargs: Any) -> FAT:
    """FAT-B1, 7.82 M params."""
    model_args = dict(embed_dims=(48, 96, 192, 384), depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create_fat('fat_b1', pretrained=pretrained, **dict(model_args, **kwargs))


@record(aliases=('FATb2', 'fatb2'))
@register_model
def fat_b2(pretrained: bool = False, **kwargs: Any) -> FAT:
    """FAT-B2."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 6, 2), num_heads=(2, 4, 8, 16))
    return _create_fat('fat_b2', pretrained=pretrained, **dict(model_args, **kwargs))


@record(aliases=('FATb3', 'fatb3'))
@register_model
def fat_b3(pretrained: bool = False, **kwargs: Any) -> FAT:
    """FAT-B3."""
    model_args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 4, 16, 4), num_heads=(2, 4, 8, 16))
    return _create_fat('fat_b3', pretrained=pretrained, **dict(model_args, **kwargs))
