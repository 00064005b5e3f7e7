"""Calibration images for low-precision deployment: one loader for a folder of real images, one normaliser
for what callers pass (a tensor or batches), and how many batches the accuracy check looks at."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from lowformer.errors import LowformerError

__all__ = ["CHECK_BATCHES", "IMAGE_SUFFIXES", "calibration_batches", "calibration_files", "load_calibration"]

# the low-precision output check runs on the first CHECK_BATCHES calibration batches, whoever calls it
CHECK_BATCHES = 4
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def calibration_batches(calibration: Iterable[torch.Tensor] | torch.Tensor | None) -> list[torch.Tensor]:
    """Calibration images as a list of N x C x H x W batches; refuses an empty or missing set."""
    if calibration is None:
        batches: list[torch.Tensor] = []
    elif isinstance(calibration, torch.Tensor):
        batches = [calibration] if calibration.numel() else []
    else:
        batches = [b if b.dim() == 4 else b.unsqueeze(0) for b in calibration if b.numel()]
    if not batches:
        raise LowformerError("int8 quantization needs calibration images: pass calibration= a tensor or batches "
                             "of preprocessed images (a few hundred real images from the target data)")
    return batches


def calibration_files(folder: str | os.PathLike | None, count: int) -> list[Path]:
    """The first ``count`` image files under ``folder`` (searched recursively, sorted), checked before any work."""
    if folder is None:
        raise LowformerError("int8 needs calibration images: give a folder of real images from the target data "
                             "(--calibration DIR)")
    folder = Path(folder)
    if not folder.is_dir():
        raise LowformerError(f"calibration folder {folder} {'is a file' if folder.exists() else 'does not exist'}; "
                             "give a folder of images")
    if count < 1:
        raise LowformerError(f"calibration image count {count} must be at least 1")
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)[:count]
    if not files:
        raise LowformerError(f"no images found under {folder} for int8 calibration "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def load_calibration(files: list[Path], model: nn.Module, image_size: int) -> torch.Tensor:
    """``files`` preprocessed with ``model``'s evaluation transform at ``image_size``: an N x C x H x W tensor."""
    from lowformer.data import eval_transform, load_image
    transform = eval_transform(model, input_size=(3, image_size, image_size))
    return torch.stack([transform(load_image(f)) for f in files])
