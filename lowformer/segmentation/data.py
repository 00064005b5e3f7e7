"""Semantic-segmentation datasets (ADE20K-style folders, PASCAL VOC) and joint transforms on transforms.v2.

Image and label map travel together as ``tv_tensors.Image`` / ``tv_tensors.Mask`` through one v2 pipeline,
so every geometric step moves both alike (the mask resized with nearest neighbours, padding 255).
Bad pairs are found when the dataset is opened, before any training: an image without a label map is
skipped and counted; a label map of another size than its image, or with values beyond the classes
other than the ignore index, raises one line naming the file (``check_labels``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from lowformer.data.images import ImageReadError, load_image
from lowformer.errors import LowformerError

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "PasteObjects",
    "SegDataError",
    "SegSample",
    "SegmentationFolder",
    "collate_seg",
    "eval_transform",
    "find_pairs",
    "train_transform",
]

_logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class SegDataError(LowformerError, ValueError):
    """A segmentation data folder or label map that cannot be used."""


@dataclass(frozen=True)
class SegSample:
    image: Path
    mask: Path


def find_pairs(root: str | os.PathLike, split: str) -> tuple[list[SegSample], int, str]:
    """Image/label-map pairs of ``split`` under ``root`` in ADE20K layout (``images/<split>``,
    ``annotations/<split>``) or PASCAL VOC layout (``JPEGImages``, ``SegmentationClass``,
    ``ImageSets/Segmentation/<split>.txt``); returns the pairs, how many images had no label map, and the
    layout's name."""
    root = Path(root).expanduser()
    if (root / "images" / split).is_dir():
        images = sorted(p for p in (root / "images" / split).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        masks = root / "annotations" / split
        if not masks.is_dir():
            raise SegDataError(f"'{masks}': label maps folder not found (ADE20K layout: annotations/{split}/*.png)")
        layout = "ade20k"
    elif (root / "ImageSets" / "Segmentation").is_dir():
        list_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not list_file.is_file():
            raise SegDataError(f"'{list_file}': split list not found (PASCAL VOC layout)")
        names = [n.strip() for n in list_file.read_text().splitlines() if n.strip()]
        images = [root / "JPEGImages" / f"{n}.jpg" for n in names]
        masks = root / "SegmentationClass"
        layout = "voc"
    else:
        raise SegDataError(f"'{root}': neither ADE20K layout (images/{split}, annotations/{split}) nor PASCAL VOC "
                           "layout (JPEGImages, SegmentationClass, ImageSets/Segmentation)")
    pairs, unlabelled = [], 0
    for image in images:
        mask = masks / f"{image.stem}.png"
        if image.is_file() and mask.is_file():
            pairs.append(SegSample(image, mask))
        else:
            unlabelled += 1
    if unlabelled:
        _logger.warning("%s/%s: %d images without a label map (or missing) skipped", root, split, unlabelled)
    if not pairs:
        raise SegDataError(f"'{root}' split '{split}': no image with a label map found")
    return pairs, unlabelled, layout


def _read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as m:
        if m.mode not in ("L", "P", "I;16", "I"):
            raise SegDataError(f"label map '{path}': mode {m.mode}, expected a single-channel (L or palette) PNG "
                               "of class indices")
        return np.asarray(m).astype(np.int64)


class SegmentationFolder(Dataset):
    """``(image, mask)`` pairs of a split; ``transform(Image, Mask)`` returns the pair transformed.

    Args:
        reduce_zero_label: ADE20K's convention: label 0 ("other") becomes the ignore index and the rest
            shift down by one. Leave off where 0 is a real class (the composite set, VOC).
        check_labels: read every label map once up front and refuse, with one line, a map whose size
            differs from its image or that holds values >= num_classes other than the ignore index.
    """

    def __init__(self, root: str | os.PathLike, split: str, num_classes: int, transform: Callable | None = None,
                 reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX, check_labels: bool = True) -> None:
        self.root, self.split, self.num_classes = Path(root), split, num_classes
        self.samples, self.unlabelled, self.layout = find_pairs(root, split)
        self.transform, self.reduce_zero_label, self.ignore_index = transform, reduce_zero_label, ignore_index
        if check_labels:
            for sample in self.samples:
                self._check(sample)

    def _labels(self, raw: np.ndarray) -> np.ndarray:
        if self.reduce_zero_label:
            raw = np.where(raw == 0, 256, raw) - 1
            raw = np.where(raw == 255, self.ignore_index, raw)
        return raw

    def _check(self, sample: SegSample) -> None:
        with Image.open(sample.image) as im:
            size = im.size
        mask = self._labels(_read_mask(sample.mask))
        if (mask.shape[1], mask.shape[0]) != size:
            raise SegDataError(f"label map '{sample.mask}' is {mask.shape[1]}x{mask.shape[0]}, its image "
                               f"'{sample.image.name}' is {size[0]}x{size[1]}: they must have the same size")
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != self.ignore_index)])
        if bad.size:
            raise SegDataError(f"label map '{sample.mask}' holds values {bad[:5].tolist()} beyond the "
                               f"{self.num_classes} classes (0..{self.num_classes - 1}, ignore {self.ignore_index}); "
                               "set num_classes, or reduce_zero_label for ADE20K's 0 = other")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        sample = self.samples[index]
        with Image.open(sample.image) as im:
            image = tv_tensors.Image(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(self._labels(_read_mask(sample.mask))))
        return image, mask

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.load(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return image, mask


def _normalize() -> list[v2.Transform]:
    return [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(MEAN, STD)]


class PasteObjects:
    """Copy-paste augmentation from a labelled photo folder (``root/<class name>/<image>``, the layout of
    a classification set): pastes ``count`` (min, max) photos onto the image, each resized to a width in
    ``size`` (pixels of the unscaled image) and an aspect ratio h/w in ``aspect``, cut to an ellipse or a
    box, where its box covers only ``free_label`` (None: anywhere, occluding what is there; a photo with no
    free place in ``tries`` draws is left out, an unreadable photo skipped with a warning naming it); the
    label map takes the folder's class under the cut.

    Folder names are matched to ``class_names`` (the segmentation classes); every folder must name one.
    Draws come from torch's generator, so DataLoader's per-worker seeding makes them reproducible.
    """

    def __init__(self, root: str | os.PathLike, class_names: Sequence[str], count: Sequence[int] = (0, 3),
                 size: Sequence[int] = (40, 112), aspect: Sequence[float] = (0.7, 1.4), shape: str = "ellipse",
                 free_label: int | None = 0, tries: int = 20) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise SegDataError(f"paste source '{root}' not found (expected <class name>/<image> folders)")
        index = {name: i for i, name in enumerate(class_names)}
        folders = sorted(d for d in root.iterdir() if d.is_dir())
        unknown = [d.name for d in folders if d.name not in index]
        if unknown:
            raise SegDataError(f"paste source '{root}': folder(s) {', '.join(unknown[:3])} name no class of "
                               f"segmentation.class_names ({', '.join(class_names) or 'none set'})")
        self.objects = [(p, index[d.name]) for d in folders for p in sorted(d.iterdir())
                        if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.objects:
            raise SegDataError(f"paste source '{root}': no images in its class folders")
        if shape not in ("ellipse", "box"):
            raise SegDataError(f"paste shape '{shape}': use ellipse or box")
        if not (0 <= count[0] <= count[1] and 1 <= size[0] <= size[1] and 0 < aspect[0] <= aspect[1]):
            raise SegDataError(f"paste count {tuple(count)}, size {tuple(size)}, aspect {tuple(aspect)}: each must "
                               "be a (min, max) range with min <= max, sizes >= 1 px")
        self.count, self.size, self.aspect = tuple(count), tuple(size), tuple(aspect)
        self.shape, self.free_label, self.tries = shape, free_label, tries

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def _randint(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], both included."""
        return int(torch.randint(lo, hi + 1, ()))

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        image, mask = image.clone(), mask.clone()
        height, width = mask.shape[-2:]
        for _ in range(self._randint(*self.count)):
            w = min(self._randint(*self.size), width)
            h = max(1, min(round(w * self._uniform(*self.aspect)), height))
            for _try in range(self.tries):
                x0, y0 = self._randint(0, width - w), self._randint(0, height - h)
                if self.free_label is None or bool((mask[..., y0:y0 + h, x0:x0 + w] == self.free_label).all()):
                    break
            else:
                continue
            path, label = self.objects[self._randint(0, len(self.objects) - 1)]
            try:
                photo = load_image(path).resize((w, h), Image.BICUBIC)
            except ImageReadError as e:
                _logger.warning("copy-paste: skipping %s", e)
                continue
            cut = Image.new("L", (w, h), 0)
            draw = ImageDraw.Draw(cut)
            (draw.ellipse if self.shape == "ellipse" else draw.rectangle)((0, 0, w - 1, h - 1), fill=255)
            inside = torch.from_numpy(np.asarray(cut) > 127)
            pixels = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1).to(image.dtype)
            region = image[:, y0:y0 + h, x0:x0 + w]
            image[:, y0:y0 + h, x0:x0 + w] = torch.where(inside, pixels, region)
            mask[..., y0:y0 + h, x0:x0 + w][..., inside] = label
        return image, mask


def train_transform(scale: Sequence[int], crop: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0),
                    hflip: float = 0.5, photometric: bool = True, paste: PasteObjects | None = None) -> v2.Compose:
    """mmseg's training pipeline on v2: resize to fit ``scale`` (h, w) times a ratio drawn from
    ``ratio_range`` keeping the aspect ratio, random crop ``crop`` (h, w) padded with 0 / 255, flip,
    photometric distortion (brightness 32/255, contrast and saturation 0.5-1.5, hue 18 degrees); ``paste``
    (copy-paste) first, on the image as read."""
    steps: list = [paste] if paste is not None else []
    steps += [
        v2.ScaleJitter(tuple(scale), scale_range=tuple(ratio_range), antialias=True),
        v2.RandomCrop(tuple(crop), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
        v2.RandomHorizontalFlip(hflip),
    ]
    if photometric:
        steps.append(v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360))
    return v2.Compose(steps + _normalize())


def eval_transform(scale: Sequence[int] | None = None) -> v2.Compose:
    """Resize the image to fit ``scale`` (h, w) keeping its aspect ratio (None: as is) and normalise; the
    mask keeps its original size, since predictions are scored at the original resolution."""
    steps: list[v2.Transform] = []
    if scale is not None:
        steps.append(_ResizeImageOnly(tuple(scale)))
    return v2.Compose(steps + _normalize())


class _ResizeImageOnly(v2.Transform):
    """Fit the image inside (h, w) keeping the aspect ratio; masks pass through unchanged."""

    def __init__(self, scale: tuple[int, int]) -> None:
        super().__init__()
        self.scale = scale

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        h, w = inpt.shape[-2:]
        r = min(self.scale[0] / h, self.scale[1] / w)
        return v2.functional.resize(inpt, [max(1, round(h * r)), max(1, round(w * r))], antialias=True)


def collate_seg(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack equally sized pairs (training crops) into ``(images, masks)``."""
    images, masks = zip(*batch)
    return torch.stack([torch.as_tensor(i) for i in images]), torch.stack([torch.as_tensor(m) for m in masks])
