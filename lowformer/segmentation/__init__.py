"""Semantic segmentation on the project's backbones: segmenters, data, metrics, inference."""
from lowformer.segmentation.data import (
    IGNORE_INDEX,
    PasteObjects,
    SegDataError,
    SegmentationFolder,
    collate_seg,
    eval_transform,
    find_pairs,
    train_transform,
)
from lowformer.segmentation.inference import infer, slide_inference, whole_inference
from lowformer.segmentation.metrics import ConfusionMatrix
from lowformer.segmentation.models import (
    ARCHS,
    Segmenter,
    SegmenterError,
    create_segmenter,
    load_encoder_checkpoint,
)

__all__ = [
    "ARCHS",
    "IGNORE_INDEX",
    "ConfusionMatrix",
    "PasteObjects",
    "SegDataError",
    "SegmentationFolder",
    "Segmenter",
    "SegmenterError",
    "collate_seg",
    "create_segmenter",
    "eval_transform",
    "find_pairs",
    "infer",
    "load_encoder_checkpoint",
    "slide_inference",
    "train_transform",
    "whole_inference",
]
