"""COCO mAP (bbox and segm) through pycocotools, from detections in COCO's results format."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lowformer.detection.data import CocoDetectionData, _quiet, collate
from lowformer.errors import import_optional

__all__ = ["coco_metrics", "detections_to_coco", "evaluate_detector"]


def detections_to_coco(outputs: list[dict[str, torch.Tensor]], image_ids: list[int], cat_ids: list[int],
                       masks: bool = False) -> list[dict[str, Any]]:
    """COCO results entries (xywh boxes, category ids, scores, and RLE ``segmentation`` for masks)."""
    mask_utils = import_optional("pycocotools.mask", "detection", "COCO results with masks")
    results = []
    for out, img_id in zip(outputs, image_ids):
        boxes = out["boxes"].detach().cpu().float()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        labels, scores = out["labels"].tolist(), out["scores"].tolist()
        rles = None
        if masks and "masks" in out:
            binary = (out["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = [mask_utils.encode(np.asfortranarray(m)) for m in binary]
            for r in rles:
                r["counts"] = r["counts"].decode("ascii")
        for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
            entry = {"image_id": int(img_id), "category_id": int(cat_ids[label]), "bbox": [round(v, 2) for v in box],
                     "score": round(float(score), 5)}
            if rles is not None:
                entry["segmentation"] = rles[i]
            results.append(entry)
    return results


def coco_metrics(coco_gt: Any, results: list[dict[str, Any]], iou_types: tuple[str, ...] = ("bbox",),
                 image_ids: list[int] | None = None) -> dict[str, Any]:
    """pycocotools' COCOeval on ``results``: ``<type>_map``, ``_map_50``, ``_map_75``, ``_map_s/m/l`` (percent)
    and ``<type>_per_class`` {category name: AP in percent, or None where the class has no ground truth}."""
    COCOeval = import_optional("pycocotools.cocoeval", "detection", "COCO mAP").COCOeval
    metrics: dict[str, Any] = {}
    names = ("map", "map_50", "map_75", "map_s", "map_m", "map_l")
    for iou_type in iou_types:
        if not results:
            metrics.update({f"{iou_type}_{n}": 0.0 for n in names})
            metrics[f"{iou_type}_per_class"] = {c["name"]: 0.0 for c in coco_gt.loadCats(coco_gt.getCatIds())}
            continue
        with _quiet():
            dt = coco_gt.loadRes(results)
            ev = COCOeval(coco_gt, dt, iou_type)
            if image_ids is not None:
                ev.params.imgIds = list(image_ids)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for n, v in zip(names, ev.stats[:6]):
            metrics[f"{iou_type}_{n}"] = round(100 * max(float(v), 0.0), 3)
        # precision: [IoU thresholds, recall points, classes, area ranges, max detections]
        precision = ev.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat_id in enumerate(ev.params.catIds):
            p = precision[:, :, k]
            p = p[p > -1]
            per_class[coco_gt.cats[cat_id]["name"]] = round(100 * float(p.mean()), 3) if p.size else None
        metrics[f"{iou_type}_per_class"] = per_class
    return metrics


@torch.no_grad()
def evaluate_detector(model: torch.nn.Module, dataset: CocoDetectionData, batch_size: int = 8,
                      device: torch.device | str = "cpu", num_workers: int = 0,
                      indices: list[int] | None = None, world_size: int = 1,
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run ``model`` (a :class:`lowformer.detection.Detector`) over ``dataset`` (or its ``indices``) and score
    it. Under torchrun each rank passes its share of ``indices`` and every rank gets the metrics of all.
    Returns (metrics with ``images``, COCO results)."""
    subset = dataset if indices is None else torch.utils.data.Subset(dataset, indices)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                         num_workers=num_workers)
    was_training = model.training
    model.eval()
    masks = bool(getattr(model, "has_masks", False))
    results, ids = [], []
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        batch_ids = [int(t["image_id"]) for t in targets]
        ids += batch_ids
        results += detections_to_coco(outputs, batch_ids, dataset.cat_ids, masks=masks)
    model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, (ids, results))
        ids = [i for g in gathered for i in g[0]]
        results = [r for g in gathered for r in g[1]]
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    metrics = {"images": len(ids), **coco_metrics(dataset.coco, results, iou_types, image_ids=ids)}
    return metrics, results
