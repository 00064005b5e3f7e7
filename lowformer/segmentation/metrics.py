"""Semantic-segmentation scores from an exact confusion matrix: mIoU, per-class IoU, pixel accuracy.

As mmseg: pixels labelled with the ignore index are left out, a class that appears neither in the labels
nor in the predictions has an undefined IoU (NaN) and is left out of the mean.
"""
from __future__ import annotations

import math

import torch

__all__ = ["ConfusionMatrix"]


class ConfusionMatrix:
    """Accumulates ``matrix[true, predicted]`` pixel counts over batches."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add label maps ``pred`` and ``target`` of equal shape (class indices)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label map {tuple(target.shape)} differ in shape")
        keep = target != self.ignore_index
        t, p = target[keep].long().cpu(), pred[keep].long().cpu()
        n = self.num_classes
        self.matrix += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def merge(self, other: torch.Tensor) -> None:
        self.matrix += other.to(self.matrix)

    def per_class_iou(self) -> list[float]:
        m = self.matrix.double()
        inter = m.diag()
        union = m.sum(0) + m.sum(1) - inter
        return [float(i / u) if u > 0 else math.nan for i, u in zip(inter, union)]

    def scores(self, class_names: list[str] | None = None) -> dict:
        """``miou``, ``pixel_acc`` and ``per_class_iou`` (class name -> IoU), all in percent."""
        ious = self.per_class_iou()
        valid = [v for v in ious if not math.isnan(v)]
        total = int(self.matrix.sum())
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {
            "miou": 100.0 * sum(valid) / len(valid) if valid else math.nan,
            "pixel_acc": 100.0 * float(self.matrix.diag().sum()) / total if total else math.nan,
            "per_class_iou": {name: (None if math.isnan(v) else 100.0 * v) for name, v in zip(names, ious)},
            "pixels": total,
        }
