"""Using a finished detection run: score it on a split, draw its detections on an image."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lowformer.detection.data import (
    CocoDetectionData,
    DetectionDataError,
    eval_transforms,
    find_split,
)
from lowformer.detection.metrics import evaluate_detector
from lowformer.detection.models import Detector
from lowformer.errors import LowformerError
from lowformer.files import atomic_output

__all__ = ["evaluate_run", "format_table", "load_run", "predict_image"]


def load_run(run_dir: str | os.PathLike, weights: str = "evalmodel.pt") -> tuple[Detector, Any]:
    """The detector of ``run_dir`` with its published weights, and the run's config."""
    import yaml

    import lowformer.detection.task  # noqa: F401  (registers the detection config section)
    from lowformer.checkpoints import (
        CheckpointError,
        extract_state_dict,
        read_checkpoint,
    )
    from lowformer.detection.task import detector_from_config
    from lowformer.train.config import config_from_dict
    from lowformer.train.rundir import RunDir
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise LowformerError(f"'{run_dir}' is not a training run: {run.config} not found")
    cfg = config_from_dict(yaml.safe_load(run.config.read_text()) or {})
    if cfg.task != "detection":
        raise LowformerError(f"'{run_dir}' is a {cfg.task} run, not a detection run")
    path = Path(run.path) / "checkpoint" / weights
    if not path.is_file():
        raise LowformerError(f"'{run_dir}' has no {path.name} yet (no epoch finished): train it first")
    state = extract_state_dict(read_checkpoint(path), path)
    if "class_count" not in state:
        raise CheckpointError(f"'{path}' is not a detector checkpoint of lowformer.detection (no class_count)")
    num_classes = int(state["class_count"])
    model = detector_from_config(cfg, num_classes, with_backbone_weights=False)
    own = model.state_dict()
    missing = [k for k in own if k not in state and own[k].is_floating_point()]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or bad:
        raise CheckpointError(f"'{path}' does not fit the run's detector ({len(missing)} missing, {len(bad)} "
                              "mismatched tensors)")
    model.load_state_dict(state, strict=False)
    return model.eval(), cfg


def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str = "val",
                 out: str | os.PathLike | None = None, weights: str = "evalmodel.pt", batch_size: int = 8,
                 device: str = "cpu", images: int | None = None) -> dict[str, Any]:
    """COCO mAP of a run's detector on ``split`` of ``data_dir``: ``images``, ``bbox_map``, ``bbox_map_50``,
    ``bbox_map_75`` ... in percent (``segm_*`` too for Mask R-CNN), ``bbox_per_class``; written to ``out``
    (through a temporary file, never half-written) when given."""
    image_dir, ann = find_split(data_dir, split)
    model, _ = load_run(run_dir, weights)
    dataset = CocoDetectionData(image_dir, ann, eval_transforms(), masks=model.has_masks)
    if len(dataset.cat_ids) != model.num_classes:
        raise DetectionDataError(f"'{ann}' lists {len(dataset.cat_ids)} categories but the run's detector has "
                                 f"{model.num_classes} classes: score it on data with the classes it was trained on")
    indices = None if images is None else list(range(min(images, len(dataset))))
    metrics, _ = evaluate_detector(model.to(device), dataset, batch_size, device, indices=indices)
    metrics = {"run": str(run_dir), "data": str(data_dir), "split": split, "weights": weights, **metrics}
    if dataset.skipped:
        metrics["skipped"] = dict(dataset.skipped)
    if out is not None:
        with atomic_output(out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """The mAP summary and per-class AP as a text table."""
    lines = [f"images: {metrics['images']}"]
    kinds = [k for k in ("bbox", "segm") if f"{k}_map" in metrics]
    lines.append(f"{'':8s}" + "".join(f"{n:>9s}" for n in ("mAP", "AP50", "AP75", "APs", "APm", "APl")))
    for k in kinds:
        lines.append(f"{k:8s}" + "".join(f"{metrics[f'{k}_{n}']:9.2f}"
                                         for n in ("map", "map_50", "map_75", "map_s", "map_m", "map_l")))
    lines.append("per-class AP (%): class" + "".join(f"  {k}" for k in kinds))
    for name in metrics[f"{kinds[0]}_per_class"]:
        vals = ["   -  " if metrics[f"{k}_per_class"][name] is None else f"{metrics[f'{k}_per_class'][name]:6.2f}"
                for k in kinds]
        lines.append(f"  {name:20s}" + "".join(f"  {v}" for v in vals))
    return "\n".join(lines)


@torch.no_grad()
def predict_image(run_dir: str | os.PathLike, image: str | os.PathLike, out: str | os.PathLike,
                  score_thresh: float = 0.3, weights: str = "evalmodel.pt",
                  class_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Detect objects in ``image`` with a run's detector and draw boxes (and masks) into ``out`` (PNG/JPEG).
    Returns the kept detections (label, name, score, box)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
    path = Path(image)
    if not path.is_file():
        raise LowformerError(f"image '{path}' not found")
    try:
        with Image.open(path) as im:
            pixels = F.pil_to_tensor(im.convert("RGB"))
    except OSError as e:
        raise LowformerError(f"image '{path}' cannot be read ({e})") from None
    model, cfg = load_run(run_dir, weights)
    if class_names is None:
        class_names = _run_class_names(cfg, model.num_classes)
    det = model([F.to_dtype(pixels, torch.float32, scale=True)])[0]
    keep = det["scores"] >= score_thresh
    boxes, labels, scores = det["boxes"][keep], det["labels"][keep], det["scores"][keep]
    drawn = pixels
    if "masks" in det and keep.any():
        drawn = draw_segmentation_masks(drawn, det["masks"][keep][:, 0] > 0.5, alpha=0.45)
    names = [f"{class_names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    drawn = draw_bounding_boxes(drawn, boxes, labels=names, width=2)
    with atomic_output(out) as tmp:
        F.to_pil_image(drawn).save(tmp)
    return [{"label": int(c), "name": class_names[int(c)], "score": round(float(s), 4),
             "box": [round(float(v), 1) for v in b]} for c, s, b in zip(labels, scores, boxes)]


def _run_class_names(cfg: Any, n: int) -> list[str]:
    """Category names from the run's training annotations when they are still there, else numbers."""
    try:
        _, ann = find_split(cfg.data_provider.data_dir, cfg.section("detection").train_split)
        cats = sorted(json.loads(Path(ann).read_text()).get("categories", []), key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        if len(names) == n:
            return names
    except (LowformerError, OSError, ValueError, KeyError):
        pass
    return [str(i) for i in range(n)]
