"""Visformer V1 (tiny, small): timm's implementation, plus what loading the original needs.

timm 1.0.31 ships ``visformer_tiny`` / ``visformer_small`` with the original's architecture and op order
(its registry entries are kept as they are). This module adds, for ``lowformer.create_model``:

* the original checkpoints (``{"model": ..., "args": Namespace, ...}`` with BatchNorm keys under a
  ``.bn`` wrapper) load through the shared Visformer ``checkpoint_filter_fn``;
* the original's evaluation crop, resize 256 then center crop 224 (``crop_pct`` 0.875 where timm says
  0.9), as the models' ``pretrained_cfg``, so ``timm.data.resolve_model_data_config`` reports it;
* ``features_only`` with the stride-2 stem output in front of the three stages (strides 2, 8, 16, 32;
  V1 has no stride-4 map).

Visformer V2, which timm lacks, is ``lowformer.models.visformer_v2``.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models import FeatureHookNet

from lowformer.checkpoints import register_checkpoint_filter
from lowformer.models._registry import register_feature_cls, register_pretrained_cfg_overlay, register_project_models
from lowformer.models.visformer_v2 import checkpoint_filter_fn

__all__ = ["VISFORMER_MODELS", "VisformerFeatures"]

VISFORMER_V1 = ["visformer_tiny", "visformer_small"]
VISFORMER_MODELS = VISFORMER_V1 + ["visformer_tiny_v2", "visformer_small_v2"]


class VisformerFeatures(FeatureHookNet):
    """timm's V1 features with the stem output in front (``stem``, ``stage1``, ``stage2``, ``stage3``).

    Hooks, not a rewrite: V1 adds its position embeddings in ``forward_features``, outside any module."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] = (0, 1, 2, 3), **kwargs: Any) -> None:
        if model.feature_info[0]["module"] != "stem":
            stem = dict(num_chs=model.stem[0].out_channels, reduction=2, module="stem")
            model.feature_info = [stem] + list(model.feature_info)
        super().__init__(model, out_indices=out_indices, no_rewrite=True, **kwargs)


register_project_models(VISFORMER_MODELS)
register_checkpoint_filter(VISFORMER_V1, checkpoint_filter_fn)
register_feature_cls(VISFORMER_V1, VisformerFeatures, (0, 1, 2, 3))
register_pretrained_cfg_overlay(VISFORMER_V1, crop_pct=0.875)
