"""Images in, tensors out: reading images safely and each model's evaluation preprocessing."""
from lowformer.data.images import BGR_INPUT_NOTE, ImageReadError, ToBGR, bundled_image, eval_transform, load_image

__all__ = ["BGR_INPUT_NOTE", "ImageReadError", "ToBGR", "bundled_image", "eval_transform", "load_image"]
