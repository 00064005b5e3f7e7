"""Images in, tensors out: reading images safely, each model's evaluation preprocessing, datasets that
skip unreadable files, and the per-batch resolution loader of the trainer."""
from lowformer.data.datasets import (
    ImageFolderDataset,
    build_eval_loader,
    build_train_loader,
    collate_skipping,
    read_class_map,
)
from lowformer.data.images import BGR_INPUT_NOTE, ImageReadError, ToBGR, bundled_image, eval_transform, load_image

__all__ = [
    "BGR_INPUT_NOTE", "ImageReadError", "ToBGR", "bundled_image", "eval_transform", "load_image",
    "ImageFolderDataset", "build_eval_loader", "build_train_loader", "collate_skipping", "read_class_map",
]
