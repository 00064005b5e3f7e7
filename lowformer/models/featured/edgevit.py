""" EdgeViT

Paper: `EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision Transformers`
    - https://arxiv.org/abs/2205.03436 (ECCV 2022)

Original code: https://github.com/saic-fi/edgevit (vendored in LowFormer as `other_models/edgevit.py`)

@inproceedings{pan2022edgevits,
  title={EdgeViTs: Competing Light-weight CNNs on Mobile Devices with Vision Transformers},
  author={Pan, Junting and Bulat, Adrian and Tan, Fuwen and Zhu, Xiatian and Dudziak, Lukasz and
    Li, Hongsheng and Tzimiropoulos, Georgios and Martinez, Brais},
  booktitle={European Conference on Computer Vision (ECCV)},
  year={2022}
}

Written for lowformer in timm's model-file layout. The original fixes the input size at construction
(`img_size`, checked in every patch embedding); here it is an optional, unchecked argument: the network
runs at any input of at least 32 pixels per side, square or not, and reproduces the original exactly
wherever the original runs (sides that are multiples of 32).
"""
from functools import partial
from typing import Any, Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import ConvMlp, DropPath, LayerNorm2d, Mlp, calculate_drop_path_rates, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from lowformer.models._api import StagedModel, init_linear
from lowformer.models._dense import check_output_stride
from lowformer.models._registry import record
from lowformer.models.featured._base import Stage, featured_cfg, map_self_attention

__all__ = ['EdgeVit']


class PatchEmbed(nn.Module):
    """Non-overlapping k x k, stride-k conv, then LayerNorm over channels (eps 1e-5, as the original)."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = LayerNorm2d(out_chs, eps=1e-5, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class LocalAgg(nn.Module):
    """Local aggregation: conv position encoding, a 1x1 -> 5x5 depthwise -> 1x1 mixer and a conv MLP,
    each residual behind BatchNorm."""

    def __init__(
            self,
            dim: int,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.conv1 = nn.Conv2d(dim, dim, 1, **dd)
        self.conv_dw = nn.Conv2d(dim, dim, 5, padding=2, groups=dim, **dd)
        self.conv2 = nn.Conv2d(dim, dim, 1, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.conv_dw(self.conv1(self.norm1(x)))))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class GlobalSparseAttn(nn.Module):
    """Multi-head attention among every r-th pixel of the map; a depthwise transposed conv (kernel = stride
    = r) spreads the result back over the r x r cells ("local propagation")."""
    fused_attn: torch.jit.Final[bool]

    def __init__(
            self,
            dim: int,
            num_heads: int,
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            sr_ratio: int = 1,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        if sr_ratio > 1:
            self.local_prop = nn.ConvTranspose2d(dim, dim, sr_ratio, stride=sr_ratio, groups=dim, **dd)
            self.norm = nn.LayerNorm(dim, eps=1e-5, **dd)
        else:
            self.local_prop = nn.Identity()
            self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, H*W, C)."""
        B, C, H, W = x.shape
        r = self.sr_ratio
        if r > 1:
            # the original samples with AvgPool2d(kernel 1, stride r), i.e. every r-th pixel
            x = x[:, :, ::r, ::r]
        h, w = x.shape[2], x.shape[3]
        x = map_self_attention(self.qkv(x.flatten(2).transpose(1, 2)), self.num_heads, self.fused_attn,
                               self.attn_drop.p if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, h * w, C)
        if r > 1:
            x = x.transpose(1, 2).reshape(B, C, h, w)
            # crop the propagated grid when a side is not a multiple of r (the original only runs when it is)
            x = self.local_prop(x)[:, :, :H, :W]
            x = self.norm(x.flatten(2).transpose(1, 2))
        return self.proj_drop(self.proj(x))


class GlobalAgg(nn.Module):
    """Global unit: conv position encoding, pre-norm sparse attention and a pre-norm MLP on tokens."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            sr_ratio: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = GlobalSparseAttn(
            dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, sr_ratio=sr_ratio, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        B, C, H, W = x.shape
        shortcut = x.flatten(2).transpose(1, 2)
        # normalise per position on the map, so the attention can sub-sample it spatially
        y = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = shortcut + self.drop_path(self.attn(y))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.transpose(1, 2).reshape(B, C, H, W)


class LGLBlock(nn.Module):
    """Local-global-local block; the local aggregation only exists where attention is sparse (r > 1)."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            sr_ratio: int,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        if sr_ratio > 1:
            self.local_agg = LocalAgg(dim, mlp_ratio, proj_drop, drop_path, act_layer, **dd)
        else:
            self.local_agg = nn.Identity()
        self.global_agg = GlobalAgg(
            dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
            drop_path=drop_path, sr_ratio=sr_ratio, act_layer=act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.global_agg(self.local_agg(x))


class EdgeVit(StagedModel):
    """EdgeViT: a 4x4 patch stem and four stages of local-global-local blocks, BatchNorm head."""

    def __init__(
            self,
            depths: Tuple[int, ...] = (1, 1, 3, 1),
            embed_dims: Tuple[int, ...] = (48, 96, 240, 384),
            head_dim: int = 48,
            mlp_ratio: float = 4.,
            sr_ratios: Tuple[int, ...] = (4, 2, 2, 1),
            qkv_bias: bool = True,
            img_size: Optional[Union[int, Tuple[int, int]]] = None,
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
            depths: Blocks per stage.
            embed_dims: Width of each stage.
            head_dim: Attention head width; heads per stage = width // head_dim.
            mlp_ratio: MLP expansion of both the local and the global units.
            sr_ratios: Attention sub-sampling ratio r per stage (1 = dense attention, no local unit).
            qkv_bias: Bias in the attention's qkv projection.
            img_size: The original's construction-time input size; accepted for compatibility and not
                enforced, since nothing in the weights depends on it.
            in_chans: Input image channels.
            num_classes: Classifier classes.
            global_pool: 'avg' or '' (no pooling).
            drop_rate: Dropout before the classifier.
            proj_drop_rate: Dropout after attention projection and MLPs (the original's `drop_rate`).
            attn_drop_rate: Dropout on attention weights.
            drop_path_rate: Stochastic depth, rising linearly over all blocks.
            act_layer: Activation of the MLPs.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.img_size = img_size

        self.stem = PatchEmbed(in_chans, embed_dims[0], 4, **dd)
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depths))
        stages = []
        prev_dim = embed_dims[0]
        reduction = 4
        for i, (depth, dim, sr) in enumerate(zip(depths, embed_dims, sr_ratios)):
            downsample = None if i == 0 else PatchEmbed(prev_dim, dim, 2, **dd)
            reduction = reduction if i == 0 else reduction * 2
            start = sum(depths[:i])
            blocks = [
                LGLBlock(
                    dim, dim // head_dim, sr, drop_path=dpr[start + j], mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, act_layer=act_layer, **dd)
                for j in range(depth)]
            stages.append(Stage(blocks, downsample))
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f'stages.{i}'))
            prev_dim = dim
        self.stages = nn.Sequential(*stages)

        self.norm = nn.BatchNorm2d(embed_dims[-1], **dd)
        self._init_head(embed_dims[-1], num_classes, global_pool, drop_rate, **dd)
        self.apply(init_linear)


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map the original EdgeViT layout (`patch_embedN`, `blocksN.i.LocalAgg/SelfAttn`) onto this one."""
    if 'stem.proj.weight' in state_dict:
        return state_dict
    out = {}
    for k, v in state_dict.items():
        k = k.replace('patch_embed1.', 'stem.')
        for i in range(4):
            k = k.replace(f'patch_embed{i + 1}.', f'stages.{i}.downsample.')
            k = k.replace(f'blocks{i + 1}.', f'stages.{i}.blocks.')
        k = k.replace('.LocalAgg.attn.', '.local_agg.conv_dw.')
        k = k.replace('.LocalAgg.', '.local_agg.')
        k = k.replace('.SelfAttn.', '.global_agg.')
        k = k.replace('.attn.LocalProp.', '.attn.local_prop.')
        out[k] = v
    return out


_cfg = partial(featured_cfg, first_conv='stem.proj', origin_url='https://github.com/saic-fi/edgevit', license='other')

default_cfgs = generate_default_cfgs({
    'edgevit_xxs.untrained': _cfg(),
    'edgevit_xs.untrained': _cfg(),
    'edgevit_s.untrained': _cfg(),
})


def _create_edgevit(variant: str, pretrained: bool = False, **kwargs: Any) -> EdgeVit:
    check_output_stride("EdgeViT", kwargs.pop("output_stride", 32))
    return build_model_with_cfg(
        EdgeVit, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **kwargs,
    )


@record(aliases=('edgevitxxs',))
@register_model
def edgevit_xxs(pretrained: bool = False, **kwargs: Any) -> EdgeVit:
    """EdgeViT-XXS, 4.07 M params."""
    model_args = dict(depths=(1, 1, 3, 2), embed_dims=(36, 72, 144, 288), head_dim=36)
    return _create_edgevit('edgevit_xxs', pretrained=pretrained, **dict(model_args, **kwargs))


@record(aliases=('edgevitxs',))
@register_model
def edgevit_xs(pretrained: bool = False, **kwargs: Any) -> EdgeVit:
    """EdgeViT-XS, 6.77 M params."""
    model_args = dict(depths=(1, 1, 3, 1), embed_dims=(48, 96, 240, 384), head_dim=48)
    return _create_edgevit('edgevit_xs', pretrained=pretrained, **dict(model_args, **kwargs))


@record(aliases=('edgevits',))
@register_model
def edgevit_s(pretrained: bool = False, **kwargs: Any) -> EdgeVit:
    """EdgeViT-S."""
    model_args = dict(depths=(1, 2, 5, 3), embed_dims=(48, 96, 240, 384), head_dim=48)
    return _create_edgevit('edgevit_s', pretrained=pretrained, **dict(model_args, **kwargs))
