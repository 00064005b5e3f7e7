"""Backbones for dense prediction (detection, segmentation): multi-scale maps of any project model."""
from lowformer.dense.backbone import DenseBackbone, DenseBackboneError, create_backbone

__all__ = ["DenseBackbone", "DenseBackboneError", "create_backbone"]
