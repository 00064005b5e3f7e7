"""DWNet: Swin's macro design with depth-wise convolution (static or dynamic) in place of window attention.

Paper: "Demystifying Local Vision Transformer: Sparse Connectivity, Weight Sharing, and Dynamic Weight"
(ICLR 2022 as "On the Connection between Local Attention and Dynamic Depth-wise Convolution"),
https://arxiv.org/abs/2106.04263, code https://github.com/Atten4Vis/DemystifyLocalViT.

@inproceedings{han2022connection,
  title={On the Connection between Local Attention and Dynamic Depth-wise Convolution},
  author={Han, Qi and Fan, Zejia and Dai, Qi and Sun, Lei and Cheng, Ming-Ming and Liu, Jiaying and Wang, Jingdong},
  booktitle={International Conference on Learning Representations},
  year={2022}
}

Three spatial operators share one network:

* ``static``: a 7x7 depth-wise convolution (``dwnet_*``);
* ``dynamic``: a 7x7 kernel per channel generated from each image's global average (``dynamic_dwnet_*``);
* ``inhomogeneous``: a 7x7 kernel generated at every pixel, shared by a block of consecutive channels
  (``i_dynamic_dwnet_*``).

Static and per-image dynamic follow the original's first commit (4aa8326); its newest commit silently
builds "dynamic" models with static operators. The inhomogeneous variant exists only in the newest
commit, as a cupy CUDA kernel; here it is plain PyTorch and runs on any device. Everything is NCHW.

Written for lowformer from the paper and the original code; no code was copied.
"""
from __future__ import annotations

import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    BatchNormAct2d,
    ConvMlp,
    ConvNormAct,
    DropPath,
    LayerNorm2d,
    PatchEmbed,
    calculate_drop_path_rates,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from lowformer.models._api import ClassifierHeadModel, init_linear
from lowformer.models._dense import check_output_stride, pad_to_multiple
from lowformer.models._registry import record

__all__ = ["DWNet", "DWNET_MODELS"]

DWNET_MODELS = [
    "dwnet_tiny", "dwnet_base", "dynamic_dwnet_tiny", "dynamic_dwnet_base",
    "i_dynamic_dwnet_tiny", "i_dynamic_dwnet_base",
]
DW_KERNELS = ("static", "dynamic", "inhomogeneous")


class DynamicDWConv2d(nn.Module):
    """Depth-wise convolution whose kernels are generated per image from its global average.

    The batch is folded into the channel axis, so one grouped convolution applies every image's own
    kernels (batched, no loop over samples)."""

    def __init__(
            self,
            dim: int,
            kernel_size: int = 7,
            reduction_ratio: int = 4,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.dilation = 1
        self.bias = nn.Parameter(torch.zeros(dim, **dd))
        self.reduce = ConvNormAct(dim, dim // reduction_ratio, 1, **dd)
        self.expand = nn.Conv2d(dim // reduction_ratio, dim * kernel_size ** 2, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        weight = self.expand(self.reduce(x.mean((2, 3), keepdim=True)))
        weight = weight.reshape(B * C, 1, self.kernel_size, self.kernel_size)
        x = F.conv2d(x.reshape(1, B * C, H, W), weight, self.bias.repeat(B),
                     padding=self.dilation * (self.kernel_size // 2), dilation=self.dilation, groups=B * C)
        return x.reshape(B, C, H, W)


class InhomogeneousDWConv2d(nn.Module):
    """Depth-wise aggregation with a kernel generated at every pixel, shared by ``group_channels``
    consecutive channels (the original's cupy kernel, here as a sum over the kernel taps)."""

    def __init__(
            self,
            dim: int,
            group_channels: int,
            kernel_size: int = 7,
            reduction_ratio: int = 4,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dim % group_channels:
            raise ValueError(f"width {dim} is not a multiple of group_channels={group_channels}")
        self.group_channels = group_channels
        self.groups = dim // group_channels
        self.kernel_size = kernel_size
        self.dilation = 1
        self.reduce = ConvNormAct(dim, dim // reduction_ratio, 1, bias=True, **dd)
        self.expand = nn.Conv2d(dim // reduction_ratio, self.groups * kernel_size ** 2, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        k, d = self.kernel_size, self.dilation
        pad = d * (k // 2)
        # (taps, B, G, 1, H, W): each tap's weights contiguous, broadcast over the group's channels
        weight = self.expand(self.reduce(x)).reshape(B, self.groups, k * k, 1, H, W).movedim(2, 0).contiguous()
        x = F.pad(x, (pad, pad, pad, pad)).reshape(B, self.groups, self.group_channels, H + 2 * pad, W + 2 * pad)
        # One shifted view per tap keeps memory at one map, where unfolding would hold k*k copies.
        out = weight[0] * x[..., :H, :W]
        for tap in range(1, k * k):
            r, s = divmod(tap, k)
            out = out.addcmul_(weight[tap], x[..., r * d:r * d + H, s * d:s * d + W])
        return out.reshape(B, C, H, W)


class DWConvMixer(nn.Module):
    """The block's spatial branch: 1x1 conv, BN, ReLU, 7x7 depth-wise operator, BN, ReLU, 1x1 conv, BN."""

    def __init__(
            self,
            dim: int,
            dw_kernel: str = "static",
            kernel_size: int = 7,
            group_channels: Optional[int] = None,
            reduction_ratio: int = 4,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.kernel_size = kernel_size
        # set by DWNet(window_pad=True); only the dynamic kernels' global average sees the padding
        self.window_pad = False
        self.pw_in = ConvNormAct(dim, dim, 1, **dd)
        if dw_kernel == "static":
            self.dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, **dd)
        elif dw_kernel == "dynamic":
            self.dw = DynamicDWConv2d(dim, kernel_size, reduction_ratio, **dd)
        elif dw_kernel == "inhomogeneous":
            if group_channels is None:
                raise ValueError("dw_kernel='inhomogeneous' needs group_channels (channels per kernel group)")
            self.dw = InhomogeneousDWConv2d(dim, group_channels, kernel_size, reduction_ratio, **dd)
        else:
            raise ValueError(f"unknown dw_kernel '{dw_kernel}', expected one of {', '.join(DW_KERNELS)}")
        self.dw_norm = BatchNormAct2d(dim, act_layer=nn.ReLU, **dd)
        self.pw_out = ConvNormAct(dim, dim, 1, apply_act=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw_in(x)
        if self.window_pad:
            x = self.dw(pad_to_multiple(x, self.kernel_size))[:, :, :x.shape[2], :x.shape[3]]
        else:
            x = self.dw(x)
        return self.pw_out(self.dw_norm(x))


class DWNetBlock(nn.Module):
    """Two residual branches: the conv mixer (no norm in front) and a BatchNorm-prenormed MLP, sharing
    one drop-path rate."""

    def __init__(
            self,
            dim: int,
            dw_kernel: str = "static",
            kernel_size: int = 7,
            group_channels: Optional[int] = None,
            mlp_ratio: float = 4.,
            reduction_ratio: int = 4,
            drop_path: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.mixer = DWConvMixer(dim, dw_kernel, kernel_size, group_channels, reduction_ratio, **dd)
        self.norm = nn.BatchNorm2d(dim, **dd)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        for fc in (self.mlp.fc1, self.mlp.fc2):  # the original's MLP is nn.Linear, initialised as such
            trunc_normal_(fc.weight, std=.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(x))
        x = x + self.drop_path(self.mlp(self.norm(x)))
        return x


class PatchMerging2d(nn.Module):
    """Swin's patch merging (the original's 2x2 concatenation order, odd sides padded) on NCHW maps.

    ``dilation`` > 0 (set by ``output_stride``) keeps the resolution: each pixel concatenates the four
    pixels ``dilation`` apart, with right/bottom zero padding, the stride-1 form of the same 2x2 kernel."""

    def __init__(self, dim: int, out_dim: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.dilation = 0
        self.norm = nn.LayerNorm(4 * dim, **dd)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        d = self.dilation
        if d == 0:
            x = F.pad(x, (0, W % 2, 0, H % 2))
            x = x.reshape(B, C, (H + 1) // 2, 2, (W + 1) // 2, 2).permute(0, 2, 4, 5, 3, 1).flatten(3)
        else:
            x = F.pad(x, (d // 2, d - d // 2, d // 2, d - d // 2))
            x = torch.cat([x[:, :, :H, :W], x[:, :, d:d + H, :W], x[:, :, :H, d:d + W], x[:, :, d:d + H, d:d + W]], dim=1)
            x = x.permute(0, 2, 3, 1)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


class DWNetStage(nn.Module):
    """Patch merging (all stages but the first), then the blocks at this width."""

    def __init__(
            self,
            in_dim: int,
            dim: int,
            depth: int,
            downsample: bool,
            drop_path: Sequence[float],
            device=None,
            dtype=None,
            **block_kwargs: Any,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.downsample = PatchMerging2d(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            DWNetBlock(dim, drop_path=drop_path[i], **block_kwargs, **dd) for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class DWNet(ClassifierHeadModel):
    """DWNet classifier: 4x4 patch stem, four stages of conv-mixer blocks, LayerNorm, average pool, linear.

    Inputs of any size run; the original classifier accepts sides that are multiples of 32 (every
    stage map even at each merge), where this model reproduces it. Other sizes are padded at each
    merge like the original's detection backbone.
    """

    def __init__(
            self,
            embed_dim: int = 96,
            depths: Tuple[int, ...] = (2, 2, 6, 2),
            dw_kernel: str = "static",
            kernel_size: int = 7,
            group_channels: Optional[Tuple[int, ...]] = None,
            mlp_ratio: float = 4.,
            reduction_ratio: int = 4,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            output_stride: int = 32,
            window_pad: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            embed_dim: Width of the first stage; each later stage doubles it.
            depths: Blocks per stage.
            dw_kernel: Spatial operator: 'static' (depth-wise conv), 'dynamic' (kernels generated per
                image) or 'inhomogeneous' (kernels generated per pixel and channel group).
            kernel_size: Side of the depth-wise kernel (the original's "window size").
            group_channels: Per stage, channels sharing one per-pixel kernel ('inhomogeneous' only;
                the original config calls this list "heads").
            mlp_ratio: MLP hidden width over block width.
            reduction_ratio: Width reduction inside the dynamic kernel generators.
            patch_size: Stride of the patch-embedding stem.
            in_chans: Input image channels.
            num_classes: Classifier outputs (0 for no classifier).
            global_pool: Global pooling type ('' for none).
            drop_rate: Dropout before the classifier.
            drop_path_rate: Stochastic depth, rising linearly over all blocks to this rate.
            output_stride: 16 or 8 keep the resolution in the last stages: their patch merging becomes
                stride 1 and their depth-wise kernels dilated (same parameters).
            window_pad: pad each map right/bottom to a multiple of ``kernel_size`` around the depth-wise
                operator and crop back, as the original detection and segmentation backbones do (the
                classifier does not); it changes the dynamic kernels at sizes that are not multiples.
        """
        check_output_stride("DWNet", output_stride, (8, 16, 32))
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        if dw_kernel not in DW_KERNELS:
            raise ValueError(f"unknown dw_kernel '{dw_kernel}', expected one of {', '.join(DW_KERNELS)}")
        num_stages = len(depths)
        if group_channels is None:
            group_channels = (None,) * num_stages
        if len(group_channels) != num_stages:
            raise ValueError(f"group_channels needs one entry per stage ({num_stages}), got {group_channels}")
        self.drop_rate = drop_rate

        self.patch_embed = PatchEmbed(
            img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=partial(LayerNorm2d, eps=1e-5), output_fmt='NCHW', **dd)

        dpr = calculate_drop_path_rates(drop_path_rate, depths, stagewise=False)
        stages = []
        in_dim, block_idx = embed_dim, 0
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            stages.append(DWNetStage(
                in_dim, dim, depth, downsample=i > 0, drop_path=dpr[block_idx:block_idx + depth],
                dw_kernel=dw_kernel, kernel_size=kernel_size, group_channels=group_channels[i],
                mlp_ratio=mlp_ratio, reduction_ratio=reduction_ratio, **dd,
            ))
            block_idx += depth
            in_dim = dim
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self._dilate(output_stride)
        for m in self.modules():
            if isinstance(m, DWConvMixer):
                m.window_pad = window_pad

        self.norm = LayerNorm2d(in_dim, eps=1e-5, **dd)
        self._init_head(in_dim, num_classes, global_pool, drop_rate, **dd)

        self.apply(init_linear)

    def _dilate(self, output_stride: int) -> None:
        """Stages past ``output_stride``: stride-1 merging at the dilation reached so far, then dilated kernels."""
        prev = 1
        for stage, info in zip(self.stages, self.feature_info):
            reduction = info["reduction"]
            if reduction > output_stride:
                stage.downsample.dilation = max(prev // output_stride, 1)
                dilation = reduction // output_stride
                for block in stage.blocks:
                    dw = block.mixer.dw
                    if isinstance(dw, nn.Conv2d):
                        dw.dilation, dw.padding = (dilation, dilation), (dilation * (dw.kernel_size[0] // 2),) * 2
                    else:
                        dw.dilation = dilation
                info["reduction"] = output_stride
            prev = reduction

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


# Original key (inside layers.i.blocks.j.) -> ours (inside stages.i.blocks.j.); first matching prefix wins.
_BLOCK_KEY_MAP = (
    ("attn2conv.conv0.", "mixer.pw_in.conv."),
    ("attn2conv.bn0.", "mixer.pw_in.bn."),
    ("attn2conv.conv.conv1.0.", "mixer.dw.reduce.conv."),  # inhomogeneous generator (Sequential)
    ("attn2conv.conv.conv1.1.", "mixer.dw.reduce.bn."),
    ("attn2conv.conv.conv2.0.", "mixer.dw.expand."),
    ("attn2conv.conv.conv1.", "mixer.dw.reduce.conv."),  # per-image generator
    ("attn2conv.conv.bn.", "mixer.dw.reduce.bn."),
    ("attn2conv.conv.conv2.", "mixer.dw.expand."),
    ("attn2conv.conv.", "mixer.dw."),  # static weight/bias, dynamic bias
    ("attn2conv.bn.", "mixer.dw_norm."),
    ("attn2conv.conv2.", "mixer.pw_out.conv."),
    ("attn2conv.bn2.", "mixer.pw_out.bn."),
    ("bn.", "norm."),
    ("mlp.", "mlp."),
)


def _remap_key(key: str) -> str:
    if m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
        stage, block, rest = m.groups()
        for old, new in _BLOCK_KEY_MAP:
            if rest.startswith(old):
                return f"stages.{stage}.blocks.{block}.{new}{rest[len(old):]}"
        raise KeyError(f"unknown DWNet block key '{key}'")
    if m := re.match(r"layers\.(\d+)\.downsample\.(.+)", key):
        return f"stages.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
    if key.startswith("head."):
        return "head.fc." + key[len("head."):]
    return key  # patch_embed.*, norm.*


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Map the original repository's keys (``layers.i.blocks.j.attn2conv.*``, nn.Linear MLPs) to ours."""
    if not any(k.startswith("layers.") for k in state_dict):
        return state_dict
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = _remap_key(key)
        if key in own and value.ndim == 2 and own[key].ndim == 4:  # nn.Linear MLP -> 1x1 conv
            value = value[:, :, None, None]
        out[key] = value
    return out


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head.fc",
        "origin_url": "https://github.com/Atten4Vis/DemystifyLocalViT", "paper_ids": "arXiv:2106.04263",
        **kwargs,
    }


# No weights are bundled or downloaded; the original release files (dwnet_tiny_224.pth, ...) load as they are
# through create_model(..., checkpoint_path=...).
default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg() for name in DWNET_MODELS})


def _create_dwnet(variant: str, pretrained: bool = False, **kwargs: Any) -> DWNet:
    return build_model_with_cfg(
        DWNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
        **kwargs,
    )


@record()
@register_model
def dwnet_tiny(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """DWNet-T: static 7x7 depth-wise convolution, Swin-T layout (24.2M params)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), dw_kernel="static")
    return _create_dwnet("dwnet_tiny", pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def dwnet_base(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """DWNet-B: static 7x7 depth-wise convolution, Swin-B layout (74.3M params)."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), dw_kernel="static")
    return _create_dwnet("dwnet_base", pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def dynamic_dwnet_tiny(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """Dynamic DWNet-T: per-image generated 7x7 depth-wise kernels (51.1M params)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), dw_kernel="dynamic")
    return _create_dwnet("dynamic_dwnet_tiny", pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def dynamic_dwnet_base(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """Dynamic DWNet-B: per-image generated 7x7 depth-wise kernels (161.6M params)."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), dw_kernel="dynamic")
    return _create_dwnet("dynamic_dwnet_base", pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def i_dynamic_dwnet_tiny(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """Inhomogeneous dynamic DWNet-T: per-pixel 7x7 kernels, 32 channel groups per stage (26.2M params)."""
    model_args = dict(embed_dim=96, depths=(2, 2, 6, 2), dw_kernel="inhomogeneous", group_channels=(3, 6, 12, 24))
    return _create_dwnet("i_dynamic_dwnet_tiny", pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def i_dynamic_dwnet_base(pretrained: bool = False, **kwargs: Any) -> DWNet:
    """Inhomogeneous dynamic DWNet-B: per-pixel 7x7 kernels, 32 channel groups per stage (80.3M params)."""
    model_args = dict(embed_dim=128, depths=(2, 2, 18, 2), dw_kernel="inhomogeneous", group_channels=(4, 8, 16, 32))
    return _create_dwnet("i_dynamic_dwnet_base", pretrained, **dict(model_args, **kwargs))

