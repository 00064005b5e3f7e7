"""Every detection and segmentation recipe in configs/ validates and builds its model (no data, no training)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lowformer.train import load_config
from lowformer.train.config import peak_lr

CONFIGS = Path(__file__).parents[1] / "configs"
DET = sorted((CONFIGS / "det").rglob("*.yaml"))
SEG = sorted((CONFIGS / "seg").rglob("*.yaml"))


def test_a_recipe_loads_without_importing_its_task_first():
    # A fresh interpreter: nothing but lowformer.train imported, as a user of the Python API or `lowformer train`.
    code = ("from lowformer.train import load_config\n"
            "from lowformer.train.task import _TASKS\n"
            f"d = load_config({str(CONFIGS / 'det' / 'composite_retinanet_b0.yaml')!r})\n"
            f"s = load_config({str(CONFIGS / 'seg' / 'composite' / 'fpn_b0.yaml')!r})\n"
            "print(d.task, d.section('detection').arch, s.task, s.section('segmentation').arch, ','.join(sorted(_TASKS)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "detection" and out[2:4] == ["segmentation", "semantic_fpn"]
    assert out[1] == load_config(CONFIGS / "det" / "composite_retinanet_b0.yaml").section("detection").arch
    assert {"detection", "segmentation"} <= set(out[4].split(","))


def test_the_coco_presets_have_recipes():
    names = {p.stem for p in DET}
    assert {"retinanet_lowformer_b0", "retinanet_lowformer_b1", "mask_rcnn_visformer_small_v2",
            "ssdlite_edgeformer_s"} <= names


@pytest.mark.parametrize("path", DET, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_detection_recipe_builds(path):
    from lowformer.detection.task import detector_from_config
    cfg = load_config(path)
    sec = cfg.section("detection")
    assert cfg.task == "detection"
    model = detector_from_config(cfg, 80, with_backbone_weights=False)
    assert model.arch == sec.arch and model.backbone_name == cfg.net_config.name and model.num_classes == 80
    if path.parent.name == "coco" and "nproc_per_node 8" in path.read_text():
        # the comments' claim: 8 processes x 2 images at a peak of 1e-4
        assert peak_lr(cfg, 8) == pytest.approx(1e-4) and cfg.data_provider.base_batch_size * 8 == 16
    if path.stem == "mask_rcnn_visformer_small_v2":  # the preset's windows and drop path reach the backbone
        assert model.cfg.backbone_kwargs["window_size"] == (14, 7)
        assert model.cfg.backbone_kwargs["drop_path_rate"] == 0.2


@pytest.mark.parametrize("path", SEG, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_segmentation_recipe_builds(path):
    from lowformer.segmentation.task import build_segmenter
    cfg = load_config(path)
    sc = cfg.section("segmentation")
    assert cfg.task == "segmentation"
    model = build_segmenter(cfg, with_checkpoint=False)
    assert model.arch == sc.arch and model.num_classes == sc.num_classes
