"""Object detection and instance segmentation on torchvision's detectors with the project's backbones."""
from lowformer.detection.models import (
    ARCHS,
    PRESETS,
    Detector,
    DetectorConfig,
    DetectorError,
    DetectorExport,
    create_detector,
    list_presets,
)

__all__ = ["ARCHS", "PRESETS", "Detector", "DetectorConfig", "DetectorError", "DetectorExport", "create_detector",
           "list_presets"]
