"""The comparison backbones of the original benchmark (``eval_cls_model.py --other NAME``), built for timing.

Their short names (``mobileones1`` -> ``mobileone_s1``) are registered by the models package
(:mod:`lowformer.models.featured.timm_families`); ``FEATURED_ALIASES`` and ``FEATURED_EXAMPLES`` are re-exported
here for bench.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from lowformer.errors import LowformerError
from lowformer.models import create_model, resolve_model_name
from lowformer.models.featured import timm_families

__all__ = ["FEATURED_EXAMPLES", "FEATURED_ALIASES", "build_model"]

FEATURED_ALIASES, FEATURED_EXAMPLES = timm_families.FEATURED_ALIASES, timm_families.FEATURED_EXAMPLES


def build_model(name: str, deploy: bool = True, seed: int = 0) -> nn.Module:
    """The model ``name`` in eval mode for timing, with seeded random weights.

    ``deploy`` applies timm's ``reparameterize_model`` walk (through :func:`lowformer.deploy.reparameterize`),
    folding the multi-branch blocks of the families that declare ``reparameterize()`` / ``fuse()``
    (FastViT, MobileOne, RepViT, SHViT, EfficientViT-M) and leaving the others unchanged, so every family is
    timed in the form it is deployed in. A detector or segmenter ``ARCH:BACKBONE``
    (:mod:`lowformer.dense.spec`) is built the same way."""
    from lowformer.dense import dense_model_from_spec, is_dense_spec
    from lowformer.deploy import reparameterize
    torch.manual_seed(seed)
    if is_dense_spec(name):  # "ARCH:BACKBONE": a detector (COCO's 80 classes) or segmenter (ADE20K's 150)
        model = dense_model_from_spec(name).eval()
        return reparameterize(model) if deploy else model
    registry_name = resolve_model_name(name)
    try:
        model = create_model(registry_name).eval()
    except TypeError as e:
        raise LowformerError(f"cannot build '{name}': {e}") from e
    if deploy:
        model = reparameterize(model)
    return model
