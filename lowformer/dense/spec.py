"""Dense models by name: ``ARCH:BACKBONE`` specs of detectors and segmenters, the one resolver that
``lowformer bench``, ``lowformer models`` and ``lowformer export`` share with model names.

``retinanet:lowformer_b0``, ``mask_rcnn:visformer_small_v2``, ``ssdlite:edgeformer_s`` name
:func:`lowformer.detection.create_detector` models (COCO's 80 classes, the preset ``ARCH_BACKBONE``
where there is one); ``upernet:dwnet_tiny`` or ``semantic_fpn:lowformer_b0`` name
:func:`lowformer.segmentation.create_segmenter` models (ADE20K's 150 classes). Each task fixes its
sizes: the test size bench times at (detectors: the preset's evaluation resize, e.g. 800x1333; SSD 320x320;
segmenters 512x512) and the size ``models`` counts at (detectors 1280x800, mmdet's; segmenters 2048x512, mmseg's).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lowformer.errors import LowformerError

__all__ = ["DenseSpec", "DenseSpecError", "parse_dense_spec", "is_dense_spec", "dense_model_from_spec",
           "dense_test_size", "set_dense_test_size", "cost_module", "COMPLEXITY_SIZES", "DEFAULT_CLASSES"]

# (height, width) at which `lowformer models` counts: mmdet's default 1280x800 input, mmseg's 2048x512.
COMPLEXITY_SIZES = {"detection": (800, 1280), "segmentation": (512, 2048)}
# COCO's object classes, ADE20K's classes: what the seeds' published sizes were counted with.
DEFAULT_CLASSES = {"detection": 80, "segmentation": 150}
# segmenters are timed at 512x512 (mmseg's crop); detectors at their preset's evaluation size
_SEGMENTATION_TEST_SIZE = (512, 512)


class DenseSpecError(LowformerError, ValueError):
    """An ``ARCH:BACKBONE`` name whose parts do not name a detector or segmenter and a model."""


@dataclass(frozen=True)
class DenseSpec:
    """A parsed ``ARCH:BACKBONE``: ``task`` is ``detection`` or ``segmentation``."""
    task: str
    arch: str
    backbone: str

    @property
    def name(self) -> str:
        return f"{self.arch}:{self.backbone}"


def _archs() -> dict[str, str]:
    from lowformer.detection.models import ARCHS as DET_ARCHS
    from lowformer.segmentation.models import ARCHS as SEG_ARCHS
    return {**{a: "detection" for a in DET_ARCHS}, **{a: "segmentation" for a in SEG_ARCHS}}


def parse_dense_spec(name: str) -> DenseSpec | None:
    """The :class:`DenseSpec` that ``name`` spells, None when ``name`` is not ``ARCH:BACKBONE`` with a known
    ARCH (other prefixes, e.g. timm's ``hf-hub:``, stay model names)."""
    if not isinstance(name, str) or name.count(":") != 1:
        return None
    arch, backbone = name.split(":")
    archs = _archs()
    if arch not in archs:
        return None
    if not backbone:
        raise DenseSpecError(f"'{name}': no backbone after the colon, e.g. {arch}:lowformer_b0")
    return DenseSpec(archs[arch], arch, backbone)


def is_dense_spec(name: str) -> bool:
    """Whether ``name`` names a detector or segmenter as ``ARCH:BACKBONE``."""
    return parse_dense_spec(name) is not None


def dense_model_from_spec(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """The detector or segmenter ``ARCH:BACKBONE`` with random weights and ``num_classes`` (default: COCO's 80
    object classes or ADE20K's 150); ``kwargs`` go to ``create_detector`` / ``create_segmenter``."""
    from lowformer.models import resolve_model_name
    spec = parse_dense_spec(name)
    if spec is None:
        raise DenseSpecError(f"'{name}' is not an ARCH:BACKBONE detector or segmenter, e.g. retinanet:lowformer_b0")
    backbone = resolve_model_name(spec.backbone)
    classes = DEFAULT_CLASSES[spec.task] if num_classes is None else num_classes
    if spec.task == "detection":
        from lowformer.detection import create_detector
        return create_detector(spec.arch, backbone, classes, **kwargs)
    from lowformer.segmentation import create_segmenter
    return create_segmenter(spec.arch, backbone, classes, **kwargs)


def dense_test_size(model: nn.Module) -> tuple[int, int] | None:
    """(height, width) a dense model is timed at, None for a classifier: a detector's evaluation size
    (shorter side ``min_size``, longer ``max_size``; SSD's fixed square), a segmenter's 512x512."""
    from lowformer.detection import Detector
    from lowformer.segmentation import Segmenter
    if isinstance(model, Detector):
        return model.test_size
    if isinstance(model, Segmenter):
        return _SEGMENTATION_TEST_SIZE
    return None


def set_dense_test_size(model: nn.Module, height: int, width: int) -> None:
    """Make a detector evaluate at ``height`` x ``width`` inputs as they come (its resize would otherwise
    scale them to the preset's size); segmenters take any size as it is."""
    from lowformer.detection import Detector
    if isinstance(model, Detector):
        model.set_test_size(height, width)


def cost_module(model: nn.Module) -> nn.Module:
    """The module whose forward pass the MAC counts price: a detector's dense part and heads without the
    data-dependent post-processing (:meth:`lowformer.detection.Detector.cost_forward`), anything else as is."""
    from lowformer.detection import Detector
    if not isinstance(model, Detector):
        return model
    return _DetectorCost(model).train(model.training)  # a counter restores the mode it found


class _DetectorCost(nn.Module):
    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Any) -> Any:
        return self.detector.cost_forward(x)
