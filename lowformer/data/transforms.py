"""Training and evaluation transforms of the recipes, built with timm's ``create_transform``."""
from __future__ import annotations

from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

__all__ = ["train_transform", "val_transform"]


def train_transform(size: int, *, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
                    randaug: tuple[int, float] | None = None, erase_p: float = 0.0,
                    interpolation: str = "random") -> Callable:
    """Random-resized crop to ``size`` -> flip -> RandAugment ``(n, m)`` -> normalise -> random erasing, as
    the original recipe (``rand-n{n}-m{m}-mstd1.0-inc1``, constant-zero erasing), no colour jitter."""
    return create_transform(
        input_size=size, is_training=True, scale=tuple(scale), hflip=hflip, color_jitter=None,
        auto_augment=f"rand-n{randaug[0]}-m{randaug[1]:g}-mstd1.0-inc1" if randaug is not None else None,
        interpolation=interpolation, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        re_prob=erase_p, re_mode="const", re_count=1,
    )


def val_transform(size: int, *, crop_ratio: float = 1.0, interpolation: str = "bicubic") -> Callable:
    """Resize the short side to ``size / crop_ratio``, center crop ``size``, normalise."""
    return create_transform(
        input_size=size, is_training=False, crop_pct=crop_ratio, interpolation=interpolation,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )
