"""Image-folder datasets that survive bad files, class maps, and the per-batch resolution loader.

A corrupt or unreadable image is skipped with a warning that names the file; the collate function
drops it from its batch and reports how many were dropped, so the trainer can count them per epoch.
The training resolution is chosen per batch by timm's ``ScheduledBatchSampler`` from a generator seeded
by the epoch, so every rank (and any number of workers, including none) uses the same size for batch i.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision.datasets import ImageFolder

from lowformer.data.images import ImageReadError, load_image
from lowformer.errors import LowformerError

__all__ = [
    "ImageFolderDataset", "SkipUnreadable", "read_class_map", "collate_skipping", "resolution_batch_sampler",
    "build_train_loader", "build_eval_loader",
]

_logger = logging.getLogger(__name__)


def read_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Folder name -> class index from a tsv with columns ``index, wnid[, name]`` (header optional), the
    format of ImageNet's ``classes.tsv``; a plain text file with one folder name per line works too."""
    path = Path(path)
    if not path.is_file():
        raise LowformerError(f"class map '{path}': file not found")
    mapping: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines()):
        cols = line.strip().split("\t") if "\t" in line else [line.strip()]
        if not cols[0]:
            continue
        if len(cols) == 1:
            mapping[cols[0]] = len(mapping)
        elif cols[0].isdigit():
            mapping[cols[1]] = int(cols[0])
        elif n > 0:
            raise LowformerError(f"class map '{path}' line {n + 1}: expected 'index<TAB>folder name', got {line!r}")
    if not mapping:
        raise LowformerError(f"class map '{path}': no classes in it")
    return mapping


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder (``root/<class>/<image>``) that yields ``(None, target)`` for an
    unreadable image instead of raising, and can take the class index from a map (wnid -> index)."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None,
                 class_map: dict[str, int] | None = None) -> None:
        self._class_map = class_map
        root = Path(root)
        if not root.is_dir():
            raise LowformerError(f"image folder '{root}' not found (expected class sub-folders with images)")
        try:
            super().__init__(str(root), transform=transform, loader=load_image)
        except FileNotFoundError as e:
            raise LowformerError(f"image folder '{root}': {e}") from None

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes, class_to_idx = super().find_classes(directory)
        if self._class_map is None:
            return classes, class_to_idx
        unknown = [c for c in classes if c not in self._class_map]
        if unknown:
            raise LowformerError(f"image folder '{directory}': {len(unknown)} folder(s) not in the class map "
                                 f"(e.g. {', '.join(unknown[:3])})")
        return classes, {c: self._class_map[c] for c in classes}

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        try:
            image = self.loader(path)
        except ImageReadError as e:
            _logger.warning("skipping %s", e)
            return None, target
        if self.transform is not None:
            image = self.transform(image)
        return image, target


class SkipUnreadable:
    """Wraps a transform so that the ``None`` of an unreadable image passes through untouched."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        return None if image is None else self.transform(image)

    def __repr__(self) -> str:
        return f"SkipUnreadable({self.transform!r})"


def collate_skipping(batch: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; the third element is how many unreadable ones were dropped."""
    kept = [(x, y) for x, y in batch if x is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images = torch.stack([x for x, _ in kept])
    targets = torch.tensor([y for _, y in kept], dtype=torch.long)
    return images, targets, len(batch) - len(kept)


def resolution_batch_sampler(sampler: Sampler, batch_size: int, num_sizes: int, seed: int,
                             drop_last: bool = True) -> Sampler:
    """Batches annotated with a resolution choice, drawn afresh each epoch from a generator seeded by
    ``seed`` and the epoch: the same sequence on every rank (timm's ``ScheduledBatchSampler``)."""
    from timm.data.scheduled_sampler import ScheduledBatchSampler
    n = len(sampler) // batch_size if drop_last else -(-len(sampler) // batch_size)
    if n < 1:
        raise LowformerError(f"the training set has {len(sampler)} images per process, fewer than one batch of "
                             f"{batch_size}; lower data_provider.base_batch_size")
    return ScheduledBatchSampler(sampler, [batch_size] * num_sizes, seed=seed, drop_last=drop_last,
                                 num_batches=n, shuffle_schedule=False)


def _worker_kwargs(workers: int, device: torch.device) -> dict:
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False,
                collate_fn=collate_skipping)


def build_train_loader(dataset: Dataset, transforms: Sequence[Callable], batch_size: int, *, rank: int,
                       world_size: int, seed: int, workers: int, device: torch.device,
                       drop_last: bool = True) -> DataLoader:
    """Shuffled, sharded training loader whose batch i has the resolution ``transforms[choice_i]``.

    The distributed sampler is used even for one process, so batch i of a 1-process run holds the
    union of batch i of every rank of an N-process run with the same seed."""
    from timm.data.scheduled_sampler import ScheduledTransformDataset
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                 drop_last=True)
    batch_sampler = resolution_batch_sampler(sampler, batch_size, len(transforms), seed, drop_last)
    scheduled = ScheduledTransformDataset(dataset, [SkipUnreadable(t) for t in transforms])
    return DataLoader(scheduled, batch_sampler=batch_sampler, **_worker_kwargs(workers, device))


class _Shard(Dataset):
    """Every world_size-th sample from ``rank``: an unpadded split, so no image is counted twice."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __len__(self) -> int:
        return len(self.indices)


def build_eval_loader(dataset: Dataset, batch_size: int, *, rank: int = 0, world_size: int = 1, workers: int = 0,
                      device: torch.device = torch.device("cpu"), indices: Sequence[int] | None = None) -> DataLoader:
    """Ordered loader over this rank's unpadded share of ``dataset`` (or of ``indices`` of it)."""
    indices = range(len(dataset)) if indices is None else indices
    shard = _Shard(dataset, list(indices)[rank::world_size])
    return DataLoader(shard, batch_size=batch_size, shuffle=False, drop_last=False, **_worker_kwargs(workers, device))
