"""Images in, tensors out: reading images safely and each model's evaluation preprocessing."""
from lowformer.data.images import ImageReadError, bundled_image, eval_transform, load_image

__all__ = ["ImageReadError", "bundled_image", "eval_transform", "load_image"]
