"""Reading images and the evaluation preprocessing of each model's recipe (from its ``pretrained_cfg``)."""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config

from lowformer.errors import LowformerError

__all__ = ["ImageReadError", "load_image", "bundled_image", "eval_transform"]


class ImageReadError(LowformerError, OSError):
    """An image file that is missing, truncated or not an image."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB, fully decoded now so that a truncated file fails here, naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise ImageReadError(f"image '{path}': file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"image '{path}': unreadable or corrupt ({e})") from None


def bundled_image() -> Path:
    """A real ImageNet validation image (class 0, tench) shipped with the package for demos and tests."""
    return Path(str(resources.files("lowformer") / "assets" / "n01440764_tench.jpg"))


def eval_transform(model: nn.Module, **overrides: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of ``model``'s recipe: resize, center crop (``crop_pct``), interpolation,
    mean/std, all from its ``pretrained_cfg``; ``overrides`` (``input_size``, ``crop_pct``,
    ``interpolation``...) replace single entries."""
    config = resolve_model_data_config(model)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return create_transform(**config, is_training=False)
