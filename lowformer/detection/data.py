"""COCO-format detection data: the composite layout (``images/<split>/``, ``annotations/instances_<split>.json``)
and COCO's own (``<split>2017/``, ``annotations/instances_<split>2017.json``), with boxes and polygon or
RLE masks, and torchvision.transforms.v2 augmentation that moves boxes and masks with the image.

Problems in a user's files are checked before any work: a missing annotation file or image folder, an
annotation list without any annotation, or a category id that is not among the file's categories raise
one clear line; images listed but absent and boxes that leave their image are skipped (or clipped) and
counted in :attr:`CocoDetectionData.skipped`.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from lowformer.errors import LowformerError, import_optional

__all__ = ["CocoDetectionData", "DetectionDataError", "collate", "eval_transforms", "find_split", "train_transforms"]

log = logging.getLogger(__name__)


class DetectionDataError(LowformerError, ValueError):
    """A dataset folder or annotation file that cannot be used."""


def find_split(data_dir: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``split`` in the composite or COCO layout."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DetectionDataError(f"data folder '{root}' not found")
    candidates = [(root / "images" / split, root / "annotations" / f"instances_{split}.json"),
                  (root / split, root / "annotations" / f"instances_{split}.json")]
    if not split.endswith("2017"):
        candidates.append((root / f"{split}2017", root / "annotations" / f"instances_{split}2017.json"))
    for images, ann in candidates:
        if images.is_dir() and ann.is_file():
            return images, ann
    tried = "; ".join(f"{i} + {a}" for i, a in candidates)
    raise DetectionDataError(f"split '{split}' not found in '{root}': expected an image folder and its annotation "
                             f"file ({tried})")


class CocoDetectionData(torch.utils.data.Dataset):
    """Images with ``{"boxes": BoundingBoxes XYXY, "labels": 0..K-1, "masks": Mask (optional), "image_id"}``.

    Labels are the categories' positions in the file's category list (sorted by id), so a model's
    ``num_classes`` is ``len(categories)`` and :attr:`cat_ids` maps labels back to COCO ids.
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike, transforms: Any = None,
                 masks: bool = False, skip_empty: bool = False) -> None:
        COCO = import_optional("pycocotools.coco", "detection", "COCO annotations").COCO
        self.images = Path(images)
        ann_path = Path(annotations)
        if not ann_path.is_file():
            raise DetectionDataError(f"annotation file '{ann_path}' not found (expected COCO instances JSON)")
        if not self.images.is_dir():
            raise DetectionDataError(f"image folder '{self.images}' not found")
        try:
            with _quiet():
                self.coco = COCO(str(ann_path))
        except (ValueError, KeyError, TypeError) as e:
            raise DetectionDataError(f"annotation file '{ann_path}' is not COCO instances JSON ({e})") from None
        if not self.coco.dataset.get("annotations"):
            raise DetectionDataError(f"annotation file '{ann_path}' has no annotations: nothing to train or score")
        self.cat_ids = sorted(self.coco.getCatIds())
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        bad = sorted({a["category_id"] for a in self.coco.dataset["annotations"]} - set(self.cat_ids))
        if bad:
            raise DetectionDataError(f"annotation file '{ann_path}': category ids {bad[:5]} are used but not listed "
                                     "under 'categories'")
        self.label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.transforms = transforms
        self.masks = masks
        self.skipped: Counter[str] = Counter()
        ids = []
        for img_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[img_id]
            if not (self.images / info["file_name"]).is_file():
                self.skipped["image listed but absent"] += 1
                continue
            if skip_empty and not self.coco.getAnnIds(imgIds=img_id, iscrowd=False):
                self.skipped["image without annotations"] += 1
                continue
            ids.append(img_id)
        self.ids = ids
        if not ids:
            raise DetectionDataError(f"none of the {len(self.coco.imgs)} images listed in '{ann_path}' is in "
                                     f"'{self.images}'")
        if self.skipped:
            log.warning("%s: skipped %s", ann_path, ", ".join(f"{n} x {k}" for k, n in self.skipped.items()))

    def __len__(self) -> int:
        return len(self.ids)

    def target(self, index: int) -> tuple[dict[str, Any], tuple[int, int]]:
        """The target of image ``index`` before transforms, and its (height, width)."""
        img_id = self.ids[index]
        info = self.coco.imgs[img_id]
        h, w = info["height"], info["width"]
        boxes, labels, masks = [], [], []
        for ann in self.coco.loadAnns(self.coco.getAnnIds(imgIds=img_id, iscrowd=False)):
            x, y, bw, bh = ann["bbox"]
            # Boxes leaving the image are clipped to it; what is left of nothing is dropped.
            x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(w), x + bw), min(float(h), y + bh)
            if (x0, y0, x1, y1) != (x, y, x + bw, y + bh):
                self.skipped["box outside its image (clipped)"] += 1
            if x1 - x0 < 1 or y1 - y0 < 1:
                self.skipped["empty box (dropped)"] += 1
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.label_of[ann["category_id"]])
            if self.masks:
                masks.append(torch.from_numpy(self.coco.annToMask(ann)))
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                              format="XYXY", canvas_size=(h, w)),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": img_id,
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8))
        return target, (h, w)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        target, (h, w) = self.target(index)
        path = self.images / self.coco.imgs[self.ids[index]]["file_name"]
        try:
            with Image.open(path) as im:
                image = tv_tensors.Image(v2.functional.pil_to_tensor(im.convert("RGB")))
        except OSError as e:
            raise DetectionDataError(f"image '{path}' cannot be read ({e})") from None
        if image.shape[-2:] != (h, w):
            raise DetectionDataError(f"image '{path}' is {image.shape[-1]}x{image.shape[-2]} but its annotation "
                                     f"says {w}x{h}")
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class _quiet:
    """pycocotools prints progress to stdout; keep the command line's output to results."""

    def __enter__(self) -> None:
        import contextlib
        import io
        self._cm = contextlib.redirect_stdout(io.StringIO())
        self._cm.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


def train_transforms(min_size: int, max_size: int, crop: int | None = None, flip: float = 0.5,
                     square: bool = False) -> v2.Compose:
    """Random resize (shorter side uniform in [min_size, max_size], or both sides for ``square``), optional
    random crop of ``crop`` x ``crop``, horizontal flip; boxes and masks follow; boxes left without area go."""
    steps: list[Any] = []
    if square:
        steps.append(v2.RandomChoice([v2.Resize((s, s)) for s in range(min_size, max_size + 1, 32)]))
    else:
        steps.append(v2.RandomResize(min_size, max_size + 1))
    if crop:
        steps.append(v2.RandomCrop(crop, pad_if_needed=True))
    if flip:
        steps.append(v2.RandomHorizontalFlip(flip))
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=2), v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation keeps the image as it is: the detector resizes it to its test size and maps boxes back."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Detection batches are lists: images differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
