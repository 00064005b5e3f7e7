"""What the featured families share besides the model API (``lowformer.models._api``): their
``pretrained_cfg``, checkpoint key renaming, a stage (optional downsample, then blocks) and self-attention
over the pixels of a map."""

from typing import Any, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["Stage", "featured_cfg", "map_self_attention", "rename_prefix"]


def featured_cfg(**kwargs: Any) -> dict[str, Any]:
    """A ``pretrained_cfg``: ImageNet-1k evaluation at 224 (where the papers count MACs), head named ``head``;
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))
