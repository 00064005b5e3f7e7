"""What the featured four-stage pyramids have in common, written once: a stage (optional downsample, then
blocks), and the timm model API around `stem -> stages -> norm -> pool -> head`.

A family module keeps its own blocks, constructor, key filter, configs and factories (timm's layout);
subclassing `PyramidClassifier` gives it `forward_features/head/intermediates`, `prune_intermediate_layers`,
`reset_classifier`, `group_matcher` and gradient checkpointing that behave the same in every family.
"""
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d, get_device_dtype, trunc_normal_
from timm.models import checkpoint_seq
from timm.models._features import feature_take_indices


def map_self_attention(qkv: torch.Tensor, num_heads: int, fused: bool, dropout_p: float) -> torch.Tensor:
    """Multi-head self-attention among the h * w pixels of a map given their (B, h * w, 3 C) projected
    q, k, v, scaled by head_dim ** -0.5, through the fused kernel when timm's fused attention is on.
    Returns (B, heads, h * w, head_dim)."""
    B, N = qkv.shape[0], qkv.shape[1]
    q, k, v = qkv.reshape(B, N, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return F.dropout(attn.softmax(dim=-1), dropout_p) @ v


class Stage(nn.Module):
    """A downsampling layer (identity when the stage keeps the resolution), then the blocks."""

    def __init__(self, blocks: List[nn.Module], downsample: Optional[nn.Module] = None):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_blocks(self.downsample(x))


class PyramidClassifier(nn.Module):
    """`stem -> stages -> norm -> global pool -> dropout -> linear`, every map NCHW.

    Subclasses build `stem`, `stages` (an nn.Sequential of `Stage`) and `feature_info`, then call
    `init_head`. `feature_info` lists the stage outputs, optionally preceded by the stem when the stem is
    the only map at its stride (FAT): taps are numbered in that order everywhere.
    """

    def init_head(self, num_features: int, norm: nn.Module, num_classes: int, global_pool: str,
                  drop_rate: float, **dd: Any) -> None:
        self.num_classes = num_classes
        # maps in front of the stage outputs (FAT's stem); fixed here, before any pruning shortens the stages
        self.stem_taps = len(self.feature_info) - len(self.stages)
        self.num_features = self.head_hidden_size = num_features
        self.norm = norm
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @staticmethod
    def init_linear(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^stem',
            blocks=r'^stages\.(\d+)' if coarse else [
                (r'^stages\.(\d+)\.(downsample|pos_embed)', (0,)),
                (r'^stages\.(\d+)\.blocks\.(\d+)', None),
                (r'^norm', (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:  # no pooling ('') keeps the 4-D map, as timm's heads do
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        dd = get_device_dtype(self)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Maps at the `feature_info` taps; `norm` applies the head's norm to the last stage's map."""
        assert output_fmt == 'NCHW', 'Output shape must be NCHW.'
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        offset = self.stem_taps
        last_idx = len(self.feature_info) - 1
        x = self.stem(x)
        if offset and 0 in take_indices:
            intermediates.append(x)
        stages = self.stages
        if stop_early and not torch.jit.is_scripting():
            stages = stages[:max(max_index + 1 - offset, 0)]
        for i, stage in enumerate(stages, start=offset):
            x = stage(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm and i == last_idx else x)
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.feature_info) - 1
        self.stages = self.stages[:max(max_index + 1 - self.stem_taps, 0)]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:  # the head was sized for the last stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if prune_head or prune_end:
            self.reset_classifier(0, '')
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
