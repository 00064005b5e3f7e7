"""Detection: torchvision detectors on project backbones, COCO data and metrics, the detection task."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import masks_to_boxes

from lowformer.detection import DetectorError, create_detector, list_presets
from lowformer.detection.data import (
    CocoDetectionData,
    DetectionDataError,
    find_split,
    train_transforms,
)
from lowformer.detection.metrics import coco_metrics

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 24) -> list[float]:
    pts = []
    for i in range(n):
        a = 2 * math.pi * i / n
        pts += [cx + rx * math.cos(a), cy + ry * math.sin(a)]
    return pts


def make_coco(root: Path, split: str = "train", n: int = 4, size: tuple[int, int] = (64, 96)) -> Path:
    """A tiny dataset in the composite layout: each image has one bright ellipse per class on noise."""
    h, w = size
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(n):
        pix = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
        for j, cat in enumerate(CATS):
            cx, cy, rx, ry = 20 + 50 * j + 2 * i, 30 - i, 12 + i, 10 + (i % 3)
            yy, xx = np.mgrid[:h, :w]
            inside = ((xx + 0.5 - cx) / rx) ** 2 + ((yy + 0.5 - cy) / ry) ** 2 <= 1
            pix[inside] = (255, 40, 40) if j == 0 else (40, 40, 255)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat["id"], "iscrowd": 0,
                         "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry], "area": math.pi * rx * ry,
                         "segmentation": [_ellipse(cx, cy, rx, ry)]})
        name = f"{split}_{i:03d}.jpg"
        Image.fromarray(pix).save(root / "images" / split / name, quality=95)
        images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": CATS}))
    return ann


TINY = {"min_size": 64, "max_size": 96, "fpn_channels": 32}


def _targets(k: int = 2) -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, 64, 96, dtype=torch.uint8)
    masks[0, 10:40, 20:60] = 1
    return [{"boxes": torch.tensor([[20.0, 10.0, 60.0, 40.0]]), "labels": torch.tensor([k - 1]), "masks": masks},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
             "masks": torch.zeros(0, 64, 96, dtype=torch.uint8)}]


def _train_step_and_predict(arch: str, backbone: str, size: tuple[int, int] = (64, 96), **settings) -> None:
    torch.manual_seed(0)
    det = create_detector(arch, backbone, num_classes=2, **{**TINY, **settings})
    images = [torch.rand(3, *size), torch.rand(3, *size)]
    targets = _targets()
    if arch != "mask_rcnn":
        targets = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    det.train()
    losses = det(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    trainable = [p for p in det.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.01)
    loss.backward()
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    det.eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2
    for o in out:
        boxes = o["boxes"]
        assert boxes.shape[1] == 4 and len(o["labels"]) == len(boxes) == len(o["scores"])
        if len(boxes):
            assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= size[1]
            assert boxes[:, [1, 3]].max() <= size[0]
            assert 0 <= int(o["labels"].min()) and int(o["labels"].max()) < 2
        if arch == "mask_rcnn":
            assert o["masks"].shape[1:] == (1, *size)


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssdlite"])
def test_each_detector_with_lowformer_b0_trains_and_predicts(arch):
    settings = {"min_size": 128, "max_size": 128} if arch == "ssdlite" else {}
    _train_step_and_predict(arch, "lowformer_b0", (128, 128) if arch == "ssdlite" else (64, 96), **settings)


# Each family once, in one detector (the full family x detector matrix is the slow test below).
FAMILY_CASES = [("retinanet", "edgeformer_xs"), ("faster_rcnn", "dwnet_tiny"), ("fcos", "fat_b0"),
                ("retinanet", "efficientmod_xxs"), ("faster_rcnn", "edgevit_xxs"), ("retinanet", "mobilevig_ti"),
                ("fcos", "ffnet_1"), ("retinanet", "inception_transformer_small")]


@pytest.mark.parametrize("arch, backbone", FAMILY_CASES)
def test_each_family_in_a_detector(arch, backbone):
    _train_step_and_predict(arch, backbone, strides=(8, 16, 32))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["retinanet", "fcos", "faster_rcnn", "mask_rcnn", "ssdlite"])
@pytest.mark.parametrize("backbone", sorted({b for _, b in FAMILY_CASES} | {"lowformer_b0", "edgeformer_s"}))
def test_family_detector_matrix(arch, backbone):
    if arch == "ssdlite":
        _train_step_and_predict(arch, backbone, (128, 128), min_size=128, max_size=128)
    else:
        _train_step_and_predict(arch, backbone, strides=(8, 16, 32))


def test_num_classes_counts_objects_only():
    ret = create_detector("retinanet", "lowformer_b0", 5, **TINY, octaves=1, aspect_ratios=(1.0,))
    assert ret.model.head.classification_head.cls_logits.out_channels == 5
    frcnn = create_detector("faster_rcnn", "lowformer_b0", 5, **TINY)
    assert frcnn.model.roi_heads.box_predictor.cls_score.out_features == 6  # + background


def test_presets_build_offline():
    det = create_detector("mask_rcnn", "visformer_small_v2", num_classes=80)
    head = det.model.roi_heads
    assert det.cfg.fpn_channels == 256 and head.box_predictor.cls_score.out_features == 81
    assert det.model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert det.model.rpn._post_nms_top_n == {"training": 1000, "testing": 1000}
    assert "mask_rcnn_visformer_small_v2" in list_presets() and "ssdlite_edgeformer_s" in list_presets()


def test_ssdlite_preset_levels_follow_edgeformer_setting():
    det = create_detector("ssdlite", "edgeformer_s", num_classes=80)
    assert det.model.anchor_generator.num_anchors_per_location() == [6, 6, 6, 6, 6, 4]
    assert det.model.backbone.out_channels == [512, 256, 256, 128, 128, 64]
    assert det.model.transform.fixed_size == (320, 320)


def test_bad_detector_requests_are_one_line():
    with pytest.raises(DetectorError, match="unknown detector 'yolo'"):
        create_detector("yolo", "lowformer_b0", 2)
    with pytest.raises(DetectorError, match="unknown detector setting"):
        create_detector("retinanet", "lowformer_b0", 2, fpn_chanels=64)
    with pytest.raises(DetectorError, match="fpn_channels 48: GroupNorm heads take 32 groups"):
        create_detector("retinanet", "lowformer_b0", 2, fpn_channels=48, head_norm="group")


# --- data ------------------------------------------------------------------------------------------------

def test_dataset_parsing(tmp_path):
    ann = make_coco(tmp_path)
    images, found = find_split(tmp_path, "train")
    assert found == ann
    ds = CocoDetectionData(images, ann, masks=True)
    assert ds.cat_ids == [3, 7] and ds.class_names == ["cat", "dog"] and len(ds) == 4
    image, target = ds[1]
    assert image.shape == (3, 64, 96)
    assert target["labels"].tolist() == [0, 1]
    raw = json.loads(ann.read_text())["annotations"][2]
    x, y, w, h = raw["bbox"]
    torch.testing.assert_close(target["boxes"][0].as_subclass(torch.Tensor),
                               torch.tensor([x, y, x + w, y + h], dtype=torch.float32))
    # The polygon's mask fills its box to within a pixel.
    torch.testing.assert_close(masks_to_boxes(target["masks"])[0], target["boxes"][0].as_subclass(torch.Tensor), atol=1.5, rtol=0)


def test_coco_layout_is_found(tmp_path):
    make_coco(tmp_path, split="val2017")
    (tmp_path / "val2017").mkdir()
    for f in (tmp_path / "images" / "val2017").iterdir():
        f.rename(tmp_path / "val2017" / f.name)
    images, ann = find_split(tmp_path, "val")
    assert images == tmp_path / "val2017" and ann.name == "instances_val2017.json"


def test_augmentation_keeps_boxes_and_masks_aligned(tmp_path):
    ann = make_coco(tmp_path)
    ds = CocoDetectionData(tmp_path / "images/train", ann, train_transforms(48, 96, crop=56, flip=0.5), masks=True)
    torch.manual_seed(0)
    seen = 0
    for _ in range(6):
        for i in range(len(ds)):
            image, t = ds[i]
            assert image.dtype == torch.float32 and image.shape[-2:] == t["masks"].shape[-2:] == (56, 56)
            keep = t["masks"].flatten(1).any(1)
            assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
            if keep.any():
                from_mask = masks_to_boxes(t["masks"][keep])
                boxes = t["boxes"][keep].as_subclass(torch.Tensor)
                # A crop cuts the box as a rectangle, so the cut ellipse's mask lies inside its box...
                assert (from_mask[:, :2] >= boxes[:, :2] - 1.5).all() and (from_mask[:, 2:] <= boxes[:, 2:] + 1.5).all()
                # ... and an object the crop leaves whole has the box of its mask.
                whole = (boxes[:, :2] > 0).all(1) & (boxes[:, 2:] < 56).all(1)
                torch.testing.assert_close(from_mask[whole], boxes[whole], atol=2.5, rtol=0)
                seen += int(whole.sum())
    assert seen >= 4


def test_missing_annotation_file(tmp_path):
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DetectionDataError, match="not found") as e:
        CocoDetectionData(tmp_path / "images/train", tmp_path / "annotations/instances_train.json")
    assert "\n" not in str(e.value)
    with pytest.raises(DetectionDataError, match="split 'train' not found"):
        find_split(tmp_path, "train")


def test_listed_but_absent_image_and_box_outside_are_skipped_and_counted(tmp_path):
    ann = make_coco(tmp_path)
    data = json.loads(ann.read_text())
    (tmp_path / "images/train" / data["images"][0]["file_name"]).unlink()
    data["annotations"][2]["bbox"] = [80.0, 20.0, 40.0, 10.0]  # leaves the 96-px-wide image
    data["annotations"][3]["bbox"] = [200.0, 20.0, 40.0, 10.0]  # entirely outside
    ann.write_text(json.dumps(data))
    ds = CocoDetectionData(tmp_path / "images/train", ann)
    assert len(ds) == 3 and ds.skipped["image listed but absent"] == 1
    _, t = ds[0]  # image 2: its first box clipped, its second dropped
    assert t["boxes"].tolist() == [[80.0, 20.0, 96.0, 30.0]]
    assert ds.skipped["box outside its image (clipped)"] == 2 and ds.skipped["empty box (dropped)"] == 1


@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(annotations=[]), "has no annotations"),
    (lambda d: d["annotations"][0].update(category_id=99), "category ids [99] are used but not listed"),
])
def test_unusable_annotations_are_one_line(tmp_path, change, words):
    ann = make_coco(tmp_path)
    data = json.loads(ann.read_text())
    change(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DetectionDataError) as e:
        CocoDetectionData(tmp_path / "images/train", ann)
    assert words in str(e.value) and "\n" not in str(e.value)


# --- metrics ---------------------------------------------------------------------------------------------

def test_coco_metrics_equal_pycocotools(tmp_path):
    ann = make_coco(tmp_path)
    gt = COCO(str(ann))
    rng = np.random.default_rng(1)
    results = []
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 3, 4)
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x + jitter[0], y + jitter[1], w + jitter[2], h + jitter[3]],
                        "score": float(rng.uniform(0.3, 1))})
        results.append({"image_id": a["image_id"], "category_id": 10 - a["category_id"], "bbox": [5, 5, 20, 20],
                        "score": float(rng.uniform(0, 0.8))})
    ours = coco_metrics(gt, results)
    ev = COCOeval(gt, gt.loadRes(results), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours["bbox_map"] == pytest.approx(100 * ev.stats[0], abs=1e-3)
    assert ours["bbox_map_50"] == pytest.approx(100 * ev.stats[1], abs=1e-3)
    assert 0 < ours["bbox_map"] < 100
    # One class evaluated alone gives the per-class AP.
    ev.params.catIds = [3]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ours["bbox_per_class"]["cat"] == pytest.approx(100 * ev.stats[0], abs=1e-3)


def test_perfect_detections_score_100(tmp_path):
    gt = COCO(str(make_coco(tmp_path)))
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt.dataset["annotations"]]
    m = coco_metrics(gt, results)
    assert m["bbox_map"] == 100.0 and m["bbox_map_50"] == 100.0


@pytest.mark.parametrize("arch, backbone", [("mask_rcnn", "visformer_tiny_v2"), ("retinanet", "visformer_tiny")])
def test_visformer_with_detection_windows_in_a_detector(arch, backbone):
    _train_step_and_predict(arch, backbone, strides=(8, 16, 32), backbone_kwargs={"window_size": (14, 7)})


# --- the detection task on the trainer -------------------------------------------------------------------

def _tiny_recipe(data: Path, **run_config):
    import lowformer.detection.task  # noqa: F401  (registers the task)
    from lowformer.train import load_config
    return load_config("configs/det/composite_retinanet_b0.yaml", {
        "data_provider": {"data_dir": str(data), "base_batch_size": 2, "n_worker": 0},
        "run_config": {"n_epochs": 2, "warmup_epochs": 0, **run_config},
        "detection": {"train_min_size": 64, "train_max_size": 64, "val_images": None, "eval_batch_size": 2,
                      "settings": {"min_size": 64, "max_size": 96, "fpn_channels": 32, "score_thresh": 0.0}},
    })


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """An uninterrupted 2-epoch run and one stopped after epoch 1 then resumed."""
    from lowformer.train import train
    root = tmp_path_factory.mktemp("det")
    make_coco(root / "data", "train", n=4)
    make_coco(root / "data", "val", n=2)
    cfg = _tiny_recipe(root / "data")
    full = train(cfg, root / "full", progress=False)
    part = train(cfg, root / "part", progress=False, stop_after_epochs=1)
    resumed = train(cfg, root / "part", resume=True, progress=False)
    return root, full, part, resumed


def test_resume_after_interruption_equals_uninterrupted(tiny_runs):
    from lowformer.checkpoints import read_checkpoint
    root, full, part, resumed = tiny_runs
    assert full["finished"] and not part["finished"] and resumed["finished"] and resumed["epochs"] == 2
    a = read_checkpoint(root / "full/checkpoint/checkpoint.pt")
    b = read_checkpoint(root / "part/checkpoint/checkpoint.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    ema_a, ema_b = next(iter(a["ema"].values())), next(iter(b["ema"].values()))
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    rows = (root / "full/metrics.csv").read_text().splitlines()
    assert "val_bbox_map" in rows[0] and len(rows) == 3
    resumed_rows = (root / "part/metrics.csv").read_text().splitlines()
    assert [r.split(",")[:1] for r in resumed_rows] == [r.split(",")[:1] for r in rows]


def test_det_eval_and_predict_commands(tiny_runs, capsys):
    from lowformer.cli import main
    root = tiny_runs[0]
    out = root / "eval.json"
    assert main(["det", "eval", "--run", str(root / "full"), "--data", str(root / "data"), "--split", "val",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 2 and 0 <= metrics["bbox_map"] <= metrics["bbox_map_50"] <= 100
    assert set(metrics["bbox_per_class"]) == {"cat", "dog"}
    assert "per-class AP" in capsys.readouterr().out
    png = root / "boxes.png"
    image = root / "data/images/val/val_000.jpg"
    assert main(["det", "predict", str(image), "--run", str(root / "full"), "--out", str(png), "--score", "0"]) == 0
    drawn = np.asarray(Image.open(png))
    assert drawn.shape == (64, 96, 3) and not np.array_equal(drawn, np.asarray(Image.open(image)))


def test_eval_with_classes_outside_the_model_is_one_line(tiny_runs, capsys):
    from lowformer.cli import main
    root = tiny_runs[0]
    other = root / "other"
    ann = make_coco(other, "val", n=2)
    data = json.loads(ann.read_text())
    data["categories"].append({"id": 9, "name": "bird"})
    data["annotations"][0]["category_id"] = 9
    ann.write_text(json.dumps(data))
    assert main(["det", "eval", "--run", str(root / "full"), "--data", str(other), "--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert "3 categories but the run's detector has 2 classes" in err and "\n" not in err
