"""Visformer V1 (tiny, small): timm's implementation, plus what loading the original and dense prediction need.

timm 1.0.31 ships ``visformer_tiny`` / ``visformer_small`` with the original's architecture and op order. This
module builds them as a subclass of timm's class, registered under timm's names (so ``timm.create_model`` and
``lowformer.create_model`` give the same model; parameters and keys stay timm's), adding:

* any input size: the position embeddings are resampled (bicubic, timm's rule) when the input is not
  ``img_size``;
* ``window_size=(14, 7)``: the original detection backbone's Swin-style shifted windows in the attention
  stages (14 at stride 16, 7 at stride 32, shifted by half a window in every other block, maps padded
  right/bottom to the window grid);
* ``stride2_feature=True``: the stem output (stride 2) as feature 0, in front of the three stages (strides 8,
  16, 32; V1 has no stride-4 map);
* the original checkpoints (``{"model": ..., "args": Namespace, ...}`` with BatchNorm keys under a ``.bn``
  wrapper) load through the shared Visformer ``checkpoint_filter_fn``;
* the original's evaluation crop, resize 256 then center crop 224 (``crop_pct`` 0.875 where timm says 0.9).

Visformer V2, which timm lacks, is ``lowformer.models.visformer_v2``.
"""
from typing import Any, Optional, Tuple

import timm.models.visformer as timm_visformer
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, checkpoint_seq

from lowformer.models._dense import check_output_stride, default_out_indices, select_taps
from lowformer.models._registry import take_over_timm_models
from lowformer.models.visformer_v2 import NumberedStages, add_pos_embed, checkpoint_filter_fn, from_windows, to_windows

__all__ = ["VISFORMER_MODELS", "Visformer", "WindowedAttention"]

VISFORMER_V1 = ["visformer_tiny", "visformer_small"]
VISFORMER_MODELS = VISFORMER_V1 + ["visformer_tiny_v2", "visformer_small_v2"]


class WindowedAttention(timm_visformer.Attention):
    """timm's Visformer attention inside (shifted) windows of the map padded to the window grid; same
    parameters, so it replaces a block's global attention in place."""

    def __init__(self, dim: int, num_heads: int, head_dim_ratio: float, window_size: int, shift_size: int = 0,
                 attn_drop: float = 0., proj_drop: float = 0., device=None, dtype=None) -> None:
        super().__init__(dim, num_heads, head_dim_ratio, attn_drop, proj_drop, device=device, dtype=dtype)
        self.window_size = window_size
        self.shift_size = shift_size

    def _attend(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        B, C, H, W = x.shape
        N = H * W
        q, k, v = self.qkv(x).reshape(B, 3, self.num_heads, self.head_dim, N).permute(1, 0, 2, 4, 3).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            attn = (attn.view(-1, mask.shape[0], self.num_heads, N, N) + mask.unsqueeze(1)).view(B, -1, N, N)
        x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.permute(0, 1, 3, 2).reshape(B, -1, H, W)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows, mask = to_windows(x, self.window_size, self.shift_size)
        return from_windows(self._attend(windows, mask), self.window_size, self.shift_size, x.shape[2], x.shape[3])


class Visformer(NumberedStages, timm_visformer.Visformer):
    """timm's Visformer V1 at any input size, with optional detection windows and stride-2 feature tap."""

    stage_numbers = (1, 2, 3)

    def __init__(
            self,
            *args: Any,
            window_size: Optional[Tuple[int, int]] = None,
            output_stride: int = 32,
            stride2_feature: bool = False,
            **kwargs: Any,
    ) -> None:
        check_output_stride("Visformer", output_stride)
        super().__init__(*args, **kwargs)
        for i in (1, 2, 3):
            patch_embed = getattr(self, f"patch_embed{i}")
            if patch_embed is not None:
                patch_embed.strict_img_size = False
        if window_size is not None:
            self._use_windows(window_size)
        taps = list(self.feature_info)
        if self.stem is not None:
            taps = [dict(num_chs=self.stem[0].out_channels, reduction=2, module="stem")] + taps
        self.feature_info, self.first_tap = select_taps(taps, stride2_feature)
        if self.stem is None:
            self.first_tap = 1

    def _use_windows(self, window_size: Tuple[int, int]) -> None:
        # the shift alternates with the block's index in the whole network, as in Visformer V2
        first = len(self.stage1)
        for stage, window in ((self.stage2, window_size[0]), (self.stage3, window_size[1])):
            for j, block in enumerate(stage):
                old = block.attn
                if old is not None:
                    block.attn = WindowedAttention(
                        old.dim, old.num_heads, old.head_dim / (old.dim // old.num_heads), window,
                        window // 2 if (first + j) % 2 else 0, old.attn_drop.p, old.proj_drop.p,
                        device=old.qkv.weight.device, dtype=old.qkv.weight.dtype)
                    block.attn.load_state_dict(old.state_dict())
            first += len(stage)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.stem is None else self.stem(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # stage by stage, as TorchScript takes no module arguments
        if self.stem is not None:
            x = self.stem(x)
        if self.patch_embed1 is not None:
            x = self.patch_embed1(x)
            if self.pos_embed1 is not None:
                x = self.pos_drop(add_pos_embed(x, self.pos_embed1))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage1, x)
        else:
            x = self.stage1(x)
        if self.patch_embed2 is not None:
            x = self.patch_embed2(x)
            if self.pos_embed2 is not None:
                x = self.pos_drop(add_pos_embed(x, self.pos_embed2))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage2, x)
        else:
            x = self.stage2(x)
        if self.patch_embed3 is not None:
            x = self.patch_embed3(x)
            if self.pos_embed3 is not None:
                x = self.pos_drop(add_pos_embed(x, self.pos_embed3))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stage3, x)
        else:
            x = self.stage3(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # defined here so fx's tracer treats this module's helpers (add_pos_embed, windows) as leaf functions:
        # it wraps them in the globals of the traced forward's module
        return self.forward_head(self.forward_features(x))


_VARIANT_ARGS = {
    "visformer_tiny": dict(init_channels=16, embed_dim=192, num_heads=3),
    "visformer_small": dict(init_channels=32, embed_dim=384, num_heads=6),
}
default_cfgs = timm_visformer.default_cfgs


def _create_visformer(variant: str, pretrained: bool = False, **kwargs: Any) -> Visformer:
    model_args = dict(depth=(7, 4, 4), mlp_ratio=4., group=8, attn_stage="011", spatial_conv="100",
                      norm_layer=nn.BatchNorm2d, conv_init=True, embed_norm=nn.BatchNorm2d, **_VARIANT_ARGS[variant])
    out_indices = kwargs.pop("out_indices", default_out_indices(kwargs, 3))
    return build_model_with_cfg(
        Visformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **dict(model_args, **kwargs),
    )


globals().update(take_over_timm_models(
    __name__, _VARIANT_ARGS, _create_visformer,
    "timm's configuration, at any input size, with ``window_size`` and ``stride2_feature``.",
    checkpoint_filter=checkpoint_filter_fn, cfg_overlay={"crop_pct": 0.875}))
