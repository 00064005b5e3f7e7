"""Inference: whole-image or sliding-window logits, resized back to the label map's size, as mmseg does."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["infer", "slide_inference", "whole_inference"]


def whole_inference(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of the whole (already normalised, batched) image."""
    return model(images)


def slide_inference(model: nn.Module, images: torch.Tensor, crop: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Average of the logits of ``crop`` (h, w) windows every ``stride`` (h, w) pixels; the last window of a
    row or column is shifted to end at the border, and a window larger than the image is the image."""
    n, _, h, w = images.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(h - ch + sh - 1, 0) // sh + 1
    cols = max(w - cw + sw - 1, 0) // sw + 1
    logits = count = None
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + ch, h), min(c * sw + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out = model(images[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = images.new_zeros((n, out.shape[1], h, w), dtype=out.dtype)
                count = images.new_zeros((1, 1, h, w), dtype=out.dtype)
            logits[:, :, y1:y2, x1:x2] += out
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def infer(model: nn.Module, images: torch.Tensor, size: Sequence[int] | None = None, mode: str = "whole",
          crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341), flip: bool = False) -> torch.Tensor:
    """Logits in ``mode`` (``whole`` or ``slide``), bilinearly resized to ``size`` (h, w) when given; with
    ``flip``, the mean of the image's logits and its mirror image's mirrored back (mmseg's flip test)."""
    if mode == "whole":
        run = whole_inference
    elif mode == "slide":
        def run(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
            return slide_inference(model, images, crop, stride)
    else:
        raise ValueError(f"inference mode '{mode}': use whole or slide")
    logits = run(model, images)
    if flip:
        logits = (logits + run(model, images.flip(-1)).flip(-1)) / 2
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits
