"""Visformer V2 (tiny, small): the 4-stage "Swin-Visformer" classifiers of the original repository.

timm ships Visformer V1 only. V2 is a different network: a 56x56 convolutional stage in front, per-stage
head counts with a fixed head dim of 32, and window attention with a Swin relative position bias in the
two attention stages (one global window at 224, shifted windows at larger multiples of 224). The blocks
reuse timm's Visformer MLP; the attention adds the relative position bias and the original's
``qk_scale`` exponent.

``qk_scale`` (the original's ``--qk-scale-factor``) is an exponent f: q and k are each multiplied by
head_dim ** f before their product, so the logits are scaled by head_dim ** (2 f). f = -0.25 is ordinary
1/sqrt(d) attention with the scale moved in front of the product (which keeps float16 from overflowing);
f = -0.5 scales the logits by 1/d, a different, softer model. The released V2 weights were trained with
-0.5 (the original README's ``--amp --qk-scale-factor=-0.5``), so -0.5 is the default here; weights
trained with the original's default need ``qk_scale=-0.25``.

``checkpoint_filter_fn`` also serves timm's V1 models (``lowformer.models.visformer``): both original
layouts differ from timm's only by the ``.bn`` segment of their BatchNorm wrappers.

Paper: "Visformer: The Vision-friendly Transformer", Chen et al., ICCV 2021, https://arxiv.org/abs/2104.12533
(V2 in later arXiv versions). Original code: https://github.com/danczs/Visformer (``swin_models.py``).

@inproceedings{chen2021visformer,
  title={Visformer: The vision-friendly transformer},
  author={Chen, Zhengsu and Xie, Lingxi and Niu, Jianwei and Liu, Xuefeng and Wei, Longhui and Tian, Qi},
  booktitle={ICCV}, pages={589--598}, year={2021}
}

Adapted for lowformer on timm's Visformer blocks.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    DropPath,
    PatchEmbed,
    calculate_drop_path_rates,
    register_notrace_function,
    resample_abs_pos_embed_nhwc,
    to_2tuple,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models.swin_transformer import get_relative_position_index
from timm.models.visformer import SpatialMlp

from lowformer.models._api import FeatureTaps, StagedModel
from lowformer.models._dense import check_output_stride, default_out_indices, pad_to_multiple, select_taps
from lowformer.models._registry import record

__all__ = ["NumberedStages", "VisformerV2"]

# Window size of each stage, hard-wired in the original; a stage whose map is not larger uses one window.
_WINDOWS = (56, 28, 14, 7)


@register_notrace_function  # reads its sizes from the input shape
def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * num_windows, C, window, window), windows in row-major order."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // window, window, W // window, window)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, C, window, window)


@register_notrace_function  # reads its sizes from the input shape
def window_reverse(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`."""
    C = windows.shape[1]
    x = windows.view(-1, H // window, W // window, C, window, window)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, C, H, W)


@register_notrace_function  # builds the mask for the input's size
def shifted_window_mask(x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Swin's -100 mask (num_windows, window^2, window^2) for the (padded, rolled) map ``x``: it keeps the
    cyclic shift from mixing the three bands along each side (the last ``shift``, the ``window - shift``
    before them, the rest)."""
    H, W = x.shape[-2], x.shape[-1]
    rows = torch.arange(H, device=x.device)
    cols = torch.arange(W, device=x.device)
    band_h = (rows >= H - window).long() + (rows >= H - shift).long()
    band_w = (cols >= W - window).long() + (cols >= W - shift).long()
    region = (band_h[:, None] * 3 + band_w[None, :]).to(x.dtype)[None, None]
    regions = window_partition(region, window).flatten(1)
    mask = regions.unsqueeze(1) - regions.unsqueeze(2)
    return torch.zeros_like(mask).masked_fill(mask != 0, -100.0)


@register_notrace_function  # resizes to the input's size
def add_pos_embed(x: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    """``x + pos_embed``, the embedding resampled (timm's bicubic rule) when ``x`` has another size than the
    one the model was built for."""
    size = (x.shape[-2], x.shape[-1])
    if pos_embed.shape[-2] != size[0] or pos_embed.shape[-1] != size[1]:
        pos_embed = resample_abs_pos_embed_nhwc(pos_embed.permute(0, 2, 3, 1), list(size)).permute(0, 3, 1, 2)
    return x + pos_embed


def to_windows(x: torch.Tensor, window: int, shift: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The map padded to the window grid, cyclically shifted by ``shift``, cut into windows; with the mask
    that keeps shifted regions that are not neighbours from mixing (None without shift)."""
    x = pad_to_multiple(x, window)
    mask: Optional[torch.Tensor] = None
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(2, 3))
        mask = shifted_window_mask(x, window, shift)
    return window_partition(x, window), mask


def from_windows(windows: torch.Tensor, window: int, shift: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`to_windows` for an H x W map: windows joined, shifted back, padding cropped."""
    Hp, Wp = H + (window - H % window) % window, W + (window - W % window) % window
    x = window_reverse(windows, window, Hp, Wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(2, 3))
    return x[:, :, :H, :W]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, NCHW, with a relative position bias.

    The qkv channels are ordered (q/k/v, head, head channel). q and k are each scaled by
    ``head_dim ** qk_scale`` before the product, as in the original (see the module docstring); the
    bias is added after that, unscaled. ``relative_position_index`` is a persistent buffer because
    the original checkpoints carry it under this key."""

    def __init__(
            self,
            dim: int,
            window_size: int,
            num_heads: int,
            qk_scale: float = -0.5,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qk_scale = qk_scale
        self.scale = self.head_dim ** qk_scale
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads, **dd))
        self.register_buffer(
            'relative_position_index', get_relative_position_index(window_size, window_size, device=device))
        self.qkv = nn.Conv2d(dim, 3 * self.head_dim * num_heads, 1, bias=False, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Conv2d(self.head_dim * num_heads, dim, 1, bias=False, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def _relative_position_bias(self) -> torch.Tensor:
        n = self.window_size * self.window_size
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, H * W).permute(1, 0, 2, 4, 3)
        q, k, v = qkv.unbind(0)
        attn = (q * self.scale) @ (k.transpose(-2, -1) * self.scale)
        attn = attn + self._relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, H * W, H * W) + mask.unsqueeze(1)
            attn = attn.view(B, self.num_heads, H * W, H * W)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).permute(0, 1, 3, 2).reshape(B, -1, H, W)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm residual block. Without attention (the convolutional stages) only the MLP branch exists,
    with its grouped 3x3 conv; with attention, the map is padded to the ``window_size`` grid and split into
    windows (cyclically shifted when ``shift_size`` > 0) and the MLP is a plain 4x one."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            window_size: int,
            shift_size: int = 0,
            attn_disabled: bool = False,
            qk_scale: float = -0.5,
            mlp_ratio: float = 4.,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            group: int = 8,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        if attn_disabled:
            self.norm1 = None
            self.attn = None
        else:
            self.norm1 = norm_layer(dim, **dd)
            self.attn = WindowAttention(dim, window_size, num_heads, qk_scale=qk_scale, attn_drop=attn_drop,
                                        proj_drop=proj_drop, **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = SpatialMlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, group=group,
                              spatial_conv=attn_disabled, **dd)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        windows, mask = to_windows(x, self.window_size, self.shift_size)
        attn = self.attn
        assert attn is not None
        return from_windows(attn(windows, mask), self.window_size, self.shift_size, x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm1 is not None:
            x = x + self.drop_path(self._attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class NumberedStages(FeatureTaps):
    """The stage hooks of ``FeatureTaps`` for Visformer (V1 and V2), whose stages are the attributes
    ``patch_embed{i}``, ``pos_embed{i}`` and ``stage{i}`` (timm's keys) rather than one sequence; a pruned
    stage has no patch embedding."""

    stage_numbers: Tuple[int, ...] = (0, 1, 2, 3)

    def _stage_count(self) -> int:
        return sum(getattr(self, f'patch_embed{i}') is not None for i in self.stage_numbers)

    def _run_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        i = self.stage_numbers[index]
        x = getattr(self, f'patch_embed{i}')(x)
        pos_embed = getattr(self, f'pos_embed{i}')
        if pos_embed is not None:
            x = self.pos_drop(add_pos_embed(x, pos_embed))
        stage = getattr(self, f'stage{i}')
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(stage, x)
        return stage(x)

    def _keep_stages(self, count: int) -> None:
        for i in self.stage_numbers[count:]:
            setattr(self, f'patch_embed{i}', None)
            setattr(self, f'pos_embed{i}', None)
            setattr(self, f'stage{i}', nn.Sequential())


class VisformerV2(NumberedStages, StagedModel):
    """Visformer V2: stem, then four stages of [strided patch embedding, absolute position embedding,
    blocks], final BatchNorm, average pool, linear head. Everything stays NCHW.

    Stages 0 and 1 are convolutional, 2 and 3 use window attention (``attn_stage``). Channels are
    embed_dim / 4, / 2, x1, x2; strides 4, 8, 16, 32. The position embeddings are sized for ``img_size``;
    ``checkpoint_filter_fn`` resamples those of a checkpoint made for another size.
    """

    def __init__(
            self,
            img_size: int = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            init_channels: int = 32,
            embed_dim: int = 256,
            depth: Sequence[int] = (1, 10, 14, 3),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            mlp_ratio: float = 4.,
            qk_scale: float = -0.5,
            attn_stage: str = '0011',
            group: int = 8,
            drop_rate: float = 0.,
            pos_drop_rate: float = 0.,
            proj_drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            global_pool: str = 'avg',
            window_size: Optional[Tuple[int, int]] = None,
            output_stride: int = 32,
            stride2_feature: bool = False,
            device=None,
            dtype=None,
    ):
        """
        Args:
            img_size: input side the position embeddings are built for (other sizes resample them).
            init_channels: stem width.
            embed_dim: width of stage 2; stages 0, 1, 3 have 1/4, 1/2 and 2x that.
            depth: blocks per stage.
            num_heads: heads per stage (unused in stages without attention).
            qk_scale: exponent applied to q and to k separately (module docstring); -0.5 for the released weights.
            attn_stage: '1' where a stage has attention; the others are convolutional blocks.
            group: groups of the 3x3 conv in convolutional blocks.
            drop_rate: dropout before the classifier; pos_drop_rate after each position embedding;
                proj_drop_rate inside the MLPs and after the attention projection.
            drop_path_rate: stochastic depth, growing linearly over all blocks.
            window_size: the original detection backbone's windows, e.g. (14, 7): windows of that side at
                strides 16 and 32, cyclically shifted by half a window (7, 3) in every other block, maps padded
                right/bottom to the window grid at any input size. None: the classifier's windows (14, 7; a
                stage shifts them only when its map at ``img_size`` holds more than one window).
            stride2_feature: list the stem output (stride 2) as feature 0, in front of strides 4-32.
        """
        check_output_stride("Visformer V2", output_stride)
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.in_chans = in_chans
        self.img_size = to_2tuple(img_size)
        self.qk_scale = qk_scale
        dpr = calculate_drop_path_rates(drop_path_rate, sum(depth))
        widths = (embed_dim // 4, embed_dim // 2, embed_dim, embed_dim * 2)

        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, init_channels, 7, stride=2, padding=3, bias=False, **dd),
            norm_layer(init_channels, **dd),
            nn.ReLU(inplace=True),
        )
        size = tuple(s // 2 for s in self.img_size)
        taps = [dict(num_chs=init_channels, reduction=2, module='stem')]
        windows = list(_WINDOWS) if window_size is None else list(_WINDOWS[:2]) + list(window_size)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        in_chs, first = init_channels, 0
        for i, (width, n) in enumerate(zip(widths, depth)):
            setattr(self, f'patch_embed{i}', PatchEmbed(
                img_size=size, patch_size=2, in_chans=in_chs, embed_dim=width, norm_layer=norm_layer,
                flatten=False, strict_img_size=False, **dd))
            size = tuple(s // 2 for s in size)
            setattr(self, f'pos_embed{i}', nn.Parameter(torch.zeros(1, width, *size, **dd)))
            # the classifier shifts only where its map holds several windows; the detection windows always do
            shifted = window_size is not None or min(size) > windows[i]
            # the shift alternates with the block's index in the whole network, not within the stage
            setattr(self, f'stage{i}', nn.Sequential(*[
                Block(
                    width, num_heads[i], windows[i],
                    shift_size=windows[i] // 2 if shifted and (first + j) % 2 else 0,
                    attn_disabled=attn_stage[i] == '0', qk_scale=qk_scale, mlp_ratio=mlp_ratio,
                    proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[first + j],
                    norm_layer=norm_layer, group=group, **dd)
                for j in range(n)
            ]))
            taps.append(dict(num_chs=width, reduction=2 ** (i + 2), module=f'stage{i}'))
            in_chs, first = width, first + n
        self.feature_info, self.first_tap = select_taps(taps, stride2_feature)
        self.norm = norm_layer(widths[-1], **dd)
        self._init_head(widths[-1], num_classes, global_pool, drop_rate, **dd)

        for i in range(4):
            trunc_normal_(getattr(self, f'pos_embed{i}'), std=.02)
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r'^stem|patch_embed0|pos_embed0',
            blocks=[
                (r'^stage(\d+)' if coarse else r'^stage(\d+)\.(\d+)', None),
                (r'^(?:patch_embed|pos_embed)(\d+)', (0,)),
                (r'^norm', (99999,)),
            ],
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # stage by stage (pruned ones are None), as TorchScript takes no module arguments
        x = self.stem(x)
        if self.patch_embed0 is not None and self.pos_embed0 is not None:
            x = self.pos_drop(add_pos_embed(self.patch_embed0(x), self.pos_embed0))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.stage0, x)
            else:
                x = self.stage0(x)
        if self.patch_embed1 is not None and self.pos_embed1 is not None:
            x = self.pos_drop(add_pos_embed(self.patch_embed1(x), self.pos_embed1))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.stage1, x)
            else:
                x = self.stage1(x)
        if self.patch_embed2 is not None and self.pos_embed2 is not None:
            x = self.pos_drop(add_pos_embed(self.patch_embed2(x), self.pos_embed2))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.stage2, x)
            else:
                x = self.stage2(x)
        if self.patch_embed3 is not None and self.pos_embed3 is not None:
            x = self.pos_drop(add_pos_embed(self.patch_embed3(x), self.pos_embed3))
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(self.stage3, x)
            else:
                x = self.stage3(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # defined here so fx's tracer treats this module's helpers (add_pos_embed, windows) as leaf functions:
        # it wraps them in the globals of the traced forward's module
        return self.forward_head(self.forward_features(x))


_BN_WRAPPER = re.compile(r'\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)$')


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map an original Visformer checkpoint (V1 ``models.py`` or V2 ``swin_models.py``) onto timm's layout.

    The original wraps each BatchNorm in a module whose child is ``bn``; its shifted-window masks
    (present only in checkpoints made above 224) are recomputed by the model. Position embeddings made
    for another input size are resampled (bicubic) to the model's. Native keys pass unchanged."""
    own = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = _BN_WRAPPER.sub(r'.\1', key)
        if key.endswith('attn_mask'):
            continue
        if key.startswith('pos_embed') and key in own and value.shape != own[key].shape:
            value = F.interpolate(value.float(), size=own[key].shape[-2:], mode='bicubic',
                                  align_corners=False).to(value.dtype)
        out[key] = value
    return out


def _create_visformer_v2(variant: str, pretrained: bool = False, **kwargs: Any) -> VisformerV2:
    out_indices = kwargs.pop('out_indices', default_out_indices(kwargs))
    return build_model_with_cfg(
        VisformerV2, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7),
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': False,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.0', 'classifier': 'head', 'license': 'apache-2.0',
        'paper_ids': 'arXiv:2104.12533', 'origin_url': 'https://github.com/danczs/Visformer',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'visformer_tiny_v2.untrained': _cfg(),
    'visformer_small_v2.untrained': _cfg(),
})


@record()
@register_model
def visformer_tiny_v2(pretrained: bool = False, **kwargs: Any) -> VisformerV2:
    """Visformer-Ti V2 (the original's ``swin_visformer_tiny_v2``), 9.4M params."""
    model_args = dict(init_channels=24, embed_dim=192, depth=(1, 4, 6, 3), num_heads=(1, 3, 6, 12))
    return _create_visformer_v2('visformer_tiny_v2', pretrained=pretrained, **dict(model_args, **kwargs))


@record()
@register_model
def visformer_small_v2(pretrained: bool = False, **kwargs: Any) -> VisformerV2:
    """Visformer-S V2 (the original's ``swin_visformer_small_v2``), 23.6M params."""
    model_args = dict(init_channels=32, embed_dim=256, depth=(1, 10, 14, 3), num_heads=(2, 4, 8, 16))
    return _create_visformer_v2('visformer_small_v2', pretrained=pretrained, **dict(model_args, **kwargs))
