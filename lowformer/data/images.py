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

__all__ = ["ImageReadError", "load_image", "bundled_image", "eval_transform", "BGR_INPUT_NOTE", "ToBGR"]

# timm's data config has no channel-order field: a family trained on BGR input (EdgeFormer, read with
# OpenCV) says so with this entry in its pretrained_cfg ``notes``, which ``eval_transform`` honours.
BGR_INPUT_NOTE = "input channel order: BGR"


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


class ToBGR:
    """Reverse the channel order of a CHW tensor (RGB to BGR); a class, so that loader workers can pickle it."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def eval_transform(model: nn.Module, **overrides: Any) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform of ``model``'s recipe: resize, center crop (``crop_pct``), interpolation,
    mean/std, all from its ``pretrained_cfg``, then RGB to BGR where the cfg's ``notes`` hold
    ``BGR_INPUT_NOTE``; ``overrides`` (``input_size``, ``crop_pct``, ``interpolation``...) replace single
    entries."""
    config = resolve_model_data_config(model)
    config.update({k: v for k, v in overrides.items() if v is not None})
    transform = create_transform(**config, is_training=False)
    notes = (getattr(model, "pretrained_cfg", None) or {}).get("notes") or ()
    if BGR_INPUT_NOTE in notes:
        transform.transforms.append(ToBGR())
    return transform
