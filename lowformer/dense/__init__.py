"""Backbones for dense prediction (detection, segmentation): multi-scale maps of any project model, and
detectors / segmenters by ``ARCH:BACKBONE`` name."""
from lowformer.dense.backbone import DenseBackbone, DenseBackboneError, create_backbone
from lowformer.dense.spec import (
    COMPLEXITY_SIZES,
    DenseSpec,
    DenseSpecError,
    cost_module,
    dense_model_from_spec,
    dense_test_size,
    is_dense_spec,
    parse_dense_spec,
    set_dense_test_size,
)

__all__ = ["COMPLEXITY_SIZES", "DenseBackbone", "DenseBackboneError", "DenseSpec", "DenseSpecError", "cost_module",
           "create_backbone", "dense_model_from_spec", "dense_test_size", "is_dense_spec", "parse_dense_spec",
           "set_dense_test_size"]
