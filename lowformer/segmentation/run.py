"""Using a trained segmentation run: score it on a split (``seg eval``) and draw a colour overlay (``seg predict``).

A run directory (``lowformer seg train``) holds ``config.yaml`` and ``checkpoint/evalmodel.pt`` (the EMA
weights of the best epoch); the segmenter is rebuilt from the config and those weights are loaded strictly.
Outputs are written to a temporary name in the target folder and renamed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from lowformer.errors import LowformerError
from lowformer.files import atomic_output
from lowformer.segmentation.data import SegmentationFolder, eval_transform
from lowformer.segmentation.inference import infer
from lowformer.segmentation.models import Segmenter
from lowformer.segmentation.task import (
    SegmentationConfig,
    build_segmenter,
    evaluate_segmenter,
)

__all__ = ["evaluate_run", "load_run", "palette", "predict_overlay"]


def load_run(run_dir: str | os.PathLike, weights: str = "evalmodel.pt") -> tuple[Segmenter, SegmentationConfig]:
    """The segmenter of a run with its published weights, in eval mode, and its ``segmentation:`` config."""
    from lowformer.checkpoints import extract_state_dict, read_checkpoint
    from lowformer.train.config import config_from_dict
    run_dir = Path(run_dir)
    config, path = run_dir / "config.yaml", run_dir / "checkpoint" / weights
    if not config.is_file():
        raise LowformerError(f"--run '{run_dir}': no config.yaml, not a run directory of `lowformer seg train`")
    if not path.is_file():
        raise LowformerError(f"--run '{run_dir}': no {path.relative_to(run_dir)} yet (train at least one epoch)")
    cfg = config_from_dict(yaml.safe_load(config.read_text()))
    if cfg.task != "segmentation":
        raise LowformerError(f"--run '{run_dir}': a {cfg.task} run, not a segmentation run")
    model = build_segmenter(cfg, with_checkpoint=False)
    model.load_state_dict(extract_state_dict(read_checkpoint(path), path))
    return model.eval(), cfg.section("segmentation")


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "val",
                 out: str | os.PathLike | None = None, device: str = "cpu", flip: bool | None = None) -> dict:
    """Score a run on ``data_dir``'s ``split``: ``images``, ``miou``, ``pixel_acc`` and ``per_class_iou``
    (percent), written as JSON to ``out`` when given. ``flip`` overrides the recipe's ``test_flip``."""
    model, sc = load_run(run_dir)
    if flip is not None:
        sc = dataclasses.replace(sc, test_flip=flip)
    dataset = SegmentationFolder(data_dir, split, sc.num_classes, eval_transform(sc.test_scale),
                                 reduce_zero_label=sc.reduce_zero_label)
    dev = torch.device(device)
    scores = evaluate_segmenter(model.to(dev), dataset, sc, dev)
    result = {"images": scores["images"], "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
              "per_class_iou": scores["per_class_iou"], "skipped_without_mask": dataset.unlabelled,
              "split": split, "data": str(data_dir), "run": str(run_dir), "test_scale": list(sc.test_scale),
              "test_mode": sc.test_mode, "test_flip": sc.test_flip}
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def palette(num_classes: int) -> np.ndarray:
    """PASCAL VOC's colour map (class index bits spread over R, G, B), ``(num_classes, 3)`` uint8."""
    colours = np.zeros((num_classes, 3), np.uint8)
    for c in range(num_classes):
        v, r, g, b = c, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (v & 1) << shift
            g |= ((v >> 1) & 1) << shift
            b |= ((v >> 2) & 1) << shift
            v >>= 3
        colours[c] = (r, g, b)
    return colours


def predict_overlay(run_dir: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
                    alpha: float = 0.5, device: str = "cpu") -> np.ndarray:
    """Segment ``image`` and write it blended with the class colours to ``out`` (PNG); returns the label map."""
    from torchvision import tv_tensors

    from lowformer.data.images import ImageReadError, load_image
    path = Path(image)
    try:
        pil = load_image(path)
    except ImageReadError as e:
        raise LowformerError(str(e)) from None
    model, sc = load_run(run_dir)
    rgb = np.asarray(pil.convert("RGB"))
    x = eval_transform(sc.test_scale)(tv_tensors.Image(torch.from_numpy(rgb.copy()).permute(2, 0, 1)))
    with torch.no_grad():
        logits = infer(model.to(device), x[None].to(device), size=rgb.shape[:2], mode=sc.test_mode,
                       crop=sc.test_crop, stride=sc.test_stride, flip=sc.test_flip)
    labels = logits.argmax(1)[0].cpu().numpy()
    blended = (rgb * (1 - alpha) + palette(sc.num_classes)[labels] * alpha).round().astype(np.uint8)
    with atomic_output(out) as tmp:
        Image.fromarray(blended).save(tmp, format="PNG")
    return labels
