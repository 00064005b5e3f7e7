"""Training and evaluation transforms of the recipes, built with timm's ``create_transform``."""
from __future__ import annotations

from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from lowformer.train.config import DataProviderConfig

__all__ = ["train_transform", "val_transform"]


def train_transform(dp: DataProviderConfig, size: int) -> Callable:
    """Random-resized crop to ``size`` -> flip -> RandAugment -> normalise -> random erasing, as the
    original recipe (``rand-n{n}-m{m}-mstd1.0-inc1``, constant-zero erasing), no colour jitter."""
    randaug = next((a for a in dp.data_aug if a.name == "randaug"), None)
    erase = next((a for a in dp.data_aug if a.name == "erase"), None)
    return create_transform(
        input_size=size, is_training=True, scale=tuple(dp.rrc_config.scale), hflip=dp.hflip, color_jitter=None,
        auto_augment=f"rand-n{randaug.n}-m{randaug.m:g}-mstd1.0-inc1" if randaug is not None else None,
        interpolation=dp.rrc_config.train_interpolate, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        re_prob=erase.p if erase is not None else 0.0, re_mode="const", re_count=1,
    )


def val_transform(dp: DataProviderConfig, size: int) -> Callable:
    """Resize the short side to ``size / test_crop_ratio``, center crop ``size``, normalise."""
    return create_transform(
        input_size=size, is_training=False, crop_pct=dp.rrc_config.test_crop_ratio,
        interpolation=dp.rrc_config.test_interpolate, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )
