"""The timm model API shared by the featured families: stem, a sequence of stages, optional final norm, head.

Every featured family is a stem followed by four stages, each at its own stride, so the parts of timm's
per-family API that only walk that skeleton (``forward_intermediates``, ``prune_intermediate_layers``,
classifier access and reset, gradient checkpointing) are written once here. A family builds ``stem``,
``stages`` (an ``nn.Sequential``), ``norm``, then ``_init_pool`` and ``head`` in its constructor, and
overrides ``forward_head`` when its head has more than pool, dropout and a linear layer.
"""

from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import SelectAdaptivePool2d, get_device_dtype
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

__all__ = ["StagedNet", "featured_cfg", "rename_prefix"]


def featured_cfg(**kwargs: Any) -> dict[str, Any]:
    """A ``pretrained_cfg``: ImageNet-1k evaluation at 224 (where the spec counts MACs), head named ``head``;
    a family adds ``first_conv``, ``origin_url``, ``license`` and the like. No weight location: nothing downloads."""
    return {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.9,
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "classifier": "head", **kwargs,
    }


def rename_prefix(key: str, table: dict[str, str], family: str) -> str:
    """Replace the first prefix of ``table`` (so list more specific prefixes first) that starts ``key``."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    raise KeyError(f"unexpected {family} checkpoint key part '{key}'")


class StagedNet(nn.Module):
    """Base class: the shared timm API over ``stem -> stages -> norm -> global_pool -> head_drop -> head``."""

    _pool_flatten = True  # False where the head applies convs to the pooled (B, C, 1, 1) map

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.feature_info: list[dict[str, Any]] = []

    def _init_pool(self, global_pool: str, drop_rate: float) -> None:
        """Create pooling and dropout after the stages: timm's feature wrappers run children in the order
        they were registered."""
        # no pooling ('') keeps the 4-D map, as timm's heads do
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=self._pool_flatten and bool(global_pool))
        self.head_drop = nn.Dropout(drop_rate)

    def _make_head(self, in_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.\w*blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool,
                                                    flatten=self._pool_flatten and bool(global_pool))
        dd = get_device_dtype(self)
        with torch.device(dd["device"]):
            self.head = self._make_head(self.head_hidden_size, num_classes).to(dtype=dd["dtype"])

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW, one per stride) and, unless ``intermediates_only``, the final features.

        Args:
            x: input images.
            indices: last n stages if int, all if None, these stage indices if a sequence.
            norm: apply the final norm to the last stage's intermediate.
            stop_early: stop after the last requested stage.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last_idx = len(self.stages) - 1
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        feat_idx = 0
        for feat_idx, stage in enumerate(stages):
            x = stage(x)
            if feat_idx in take_indices:
                intermediates.append(self.norm(x) if norm and feat_idx == last_idx else x)
        if intermediates_only:
            return intermediates
        if feat_idx == last_idx:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drop the stages after the last of ``indices`` (and the norm / head if asked)."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        if prune_end:  # norm and head were sized for the last stage
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_head or prune_end:
            self._remove_head()
        return take_indices

    def _remove_head(self) -> None:
        self.reset_classifier(0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
