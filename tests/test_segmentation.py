"""Segmenters, data pipeline, metrics and inference of lowformer.segmentation."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from lowformer.segmentation import (
    ARCHS,
    ConfusionMatrix,
    PasteObjects,
    SegDataError,
    SegmentationFolder,
    SegmenterError,
    create_segmenter,
    eval_transform,
    infer,
    slide_inference,
    train_transform,
)

# One small model per family; every family goes through one head in CI, the full matrix is slow.
FAMILIES = ["lowformer_b0", "edgeformer_xs", "dwnet_tiny", "visformer_tiny_v2",
            "efficientmod_xxs", "mobilevig_ti", "ffnet_1"]


def _train_step_and_predict(model: torch.nn.Module, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, model.num_classes, (2, 64, 64))
    y[:, :4] = 255
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    out = model(x)
    logits = out["out"] if isinstance(out, dict) else out
    assert logits.shape == (2, model.num_classes, 64, 64)
    loss = F.cross_entropy(logits, y, ignore_index=255)
    if isinstance(out, dict):
        loss = loss + model.aux_weight * F.cross_entropy(out["aux"], y, ignore_index=255)
    before = [p.detach().clone() for p in model.parameters()]
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed > len(before) // 2
    model.eval()
    with torch.no_grad():
        pred = model(torch.randn(1, 3, *size))
    assert pred.shape == (1, model.num_classes, *size) and torch.isfinite(pred).all()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_each_head_on_b0_trains_and_predicts_non_square(arch: str) -> None:
    _train_step_and_predict(create_segmenter(arch, "lowformer_b0", num_classes=5), (72, 40))


@pytest.mark.parametrize("backbone", FAMILIES)
def test_each_family_in_one_head(backbone: str) -> None:
    model = create_segmenter("segformer", backbone, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 80, 48))
    assert out.shape == (1, 3, 80, 48) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("backbone", FAMILIES)
def test_full_matrix(arch: str, backbone: str) -> None:
    _train_step_and_predict(create_segmenter(arch, backbone, num_classes=4), (96, 64))


def test_backbone_without_stride_4_map_is_one_clear_error() -> None:
    # Visformer V1's taps are at strides 8/16/32; smp's decoders need the 4-32 pyramid.
    with pytest.raises(SegmenterError, match="visformer_tiny: cannot be built"):
        create_segmenter("semantic_fpn", "visformer_tiny", 3)


def test_upernet_has_aux_fcn_head_in_training_only() -> None:
    model = create_segmenter("upernet", "lowformer_b0", num_classes=7)
    assert model.aux_weight == 0.4
    conv = model.aux_head[0][0]
    assert conv.in_channels == 128 and conv.out_channels == 256  # stride-16 stage of B0, mmseg's 256 channels
    model.eval()
    assert isinstance(model(torch.randn(1, 3, 64, 64)), torch.Tensor)


def test_dwnet_tiny_upernet_builds_offline_at_published_size() -> None:
    model = create_segmenter("upernet", "dwnet_tiny", num_classes=150)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert 55.0 < params < 58.0  # the DWNet paper's 56M (mmseg counts the auxiliary head too)


def test_unknown_arch_and_bad_output_stride() -> None:
    with pytest.raises(SegmenterError, match="unknown"):
        create_segmenter("maskformer", "lowformer_b0", 3)
    with pytest.raises(SegmenterError, match="output_stride"):
        create_segmenter("upernet", "lowformer_b0", 3, output_stride=8)


def test_encoder_loads_classification_checkpoint(tmp_path) -> None:
    import lowformer
    classifier = lowformer.create_model("lowformer_b0", num_classes=10)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "cls.pt"
    torch.save({"state_dict": classifier.state_dict()}, path)
    model = create_segmenter("semantic_fpn", "lowformer_b0", 4, checkpoint_path=path).eval()
    fresh = create_segmenter("semantic_fpn", "lowformer_b0", 4).eval()
    reference = lowformer.create_model("lowformer_b0", features_only=True, checkpoint_path=path, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs, untouched = model.net.encoder.model(x), reference(x), fresh.net.encoder.model(x)
    assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert not torch.allclose(ours[-1], untouched[-1])


def test_encoder_checkpoint_of_other_variant_is_refused(tmp_path) -> None:
    import lowformer
    from lowformer.errors import LowformerError
    path = tmp_path / "b1.pt"
    torch.save(lowformer.create_model("lowformer_b1").state_dict(), path)
    with pytest.raises(LowformerError, match="lowformer_b0"):
        create_segmenter("semantic_fpn", "lowformer_b0", 4, checkpoint_path=path)


# --- data ------------------------------------------------------------------------------------------------
def _write_pair(root, split: str, name: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")


def _square_pair(h: int = 90, w: int = 120) -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    image[20:60, 30:100] = 250
    mask[20:60, 30:100] = 2
    return image, mask


def test_augmentation_keeps_image_and_mask_aligned() -> None:
    image, mask = _square_pair()
    t = train_transform((64, 96), (48, 48), photometric=False)
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = t(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)), tv_tensors.Mask(torch.from_numpy(mask)))
        assert x.shape == (3, 48, 48) and y.shape == (48, 48) and y.dtype == torch.int64
        bright = x[0] > 0.5  # the square, after normalisation
        fg = y == 2
        # padding: mask 255 exactly where the image holds the 0 fill
        pad = y == 255
        assert set(torch.unique(y).tolist()) <= {0, 2, 255}
        assert (x[0][pad] < -2.0).all()
        # the square's outline may differ by the resampling kernel, one pixel at most
        disagree = (bright ^ fg).float()
        border = F.max_pool2d(bright[None, None].float(), 3, 1, 1)[0, 0] - (
            -F.max_pool2d(-bright[None, None].float(), 3, 1, 1)[0, 0])
        assert (disagree * (1 - border)).sum() == 0


def _paste_source(root, colours: dict[str, tuple[int, int, int]]):
    """A classification folder: four 8x8 photos of one solid colour per class."""
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("shape", ["ellipse", "box"])
def test_paste_objects_labels_each_cut_with_its_folders_class(tmp_path, shape: str) -> None:
    names = ["background", "cat", "ship", "dog"]
    colours = {"cat": (250, 0, 0), "dog": (0, 0, 250)}  # no "ship" folder: a source may cover some classes
    paste = PasteObjects(_paste_source(tmp_path / "src", colours), names, count=(3, 3), size=(12, 20),
                         aspect=(0.7, 1.4), shape=shape)
    image, mask = _square_pair()  # a "ship" square (label 2) of value 250 on black
    image, mask = torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(mask).long()
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        x, y = paste(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert isinstance(x, tv_tensors.Image) and isinstance(y, tv_tensors.Mask)
        assert torch.equal(y[mask == 2], mask[mask == 2])  # the existing object is never covered
        assert torch.equal(x[:, mask == 2], image[:, mask == 2])
        changed = y != mask
        assert torch.equal(changed, (x != image).any(0))  # the image changed exactly under the new labels
        for label, colour in ((1, colours["cat"]), (3, colours["dog"])):
            cut = y == label
            seen.add(label) if cut.any() else None
            assert torch.equal(x[:, cut], torch.tensor(colour, dtype=torch.uint8)[:, None].expand(3, int(cut.sum())))
        # each paste's cut fills its box (box) or about pi/4 of it (ellipse): 3 pastes of 12-20 px
        area = int(changed.sum())
        assert 0 < area <= 3 * 20 * 28
        torch.manual_seed(seed)
        x2, y2 = paste(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert torch.equal(x, x2) and torch.equal(y, y2)  # torch's generator decides every draw
    assert seen == {1, 3}
    # one paste, alone on an empty image: its cut is an ellipse inscribed in its box, or the box
    one = PasteObjects(tmp_path / "src", names, count=(1, 1), size=(20, 20), aspect=(1.0, 1.0), shape=shape)
    torch.manual_seed(0)
    _, y = one(tv_tensors.Image(torch.zeros(3, 40, 40, dtype=torch.uint8)), tv_tensors.Mask(torch.zeros(40, 40).long()))
    ys, xs = torch.nonzero(y, as_tuple=True)
    assert int(ys.max() - ys.min()) == 19 and int(xs.max() - xs.min()) == 19
    expected = 400 if shape == "box" else math.pi * 100
    assert abs(int((y > 0).sum()) - expected) < 0.05 * expected


def test_paste_objects_anywhere_covers_and_full_image_skips(tmp_path) -> None:
    src = _paste_source(tmp_path / "src", {"cat": (250, 0, 0)})
    names = ["background", "cat"]
    full = tv_tensors.Mask(torch.ones(30, 30).long())  # no free background anywhere
    image = tv_tensors.Image(torch.zeros(3, 30, 30, dtype=torch.uint8))
    torch.manual_seed(0)
    x, y = PasteObjects(src, names, count=(2, 2), size=(10, 10))(image, full)
    assert torch.equal(y, full) and not x.any()  # no free place: nothing pasted
    full0 = tv_tensors.Mask(torch.zeros(30, 30).long())
    torch.manual_seed(0)
    _, y = PasteObjects(src, names, count=(1, 1), size=(10, 10), free_label=None)(image, tv_tensors.Mask(full0 + 5))
    assert int((y == 1).sum()) > 0  # free_label None pastes over whatever is there


def test_paste_objects_skips_an_unreadable_photo_naming_it(tmp_path, caplog) -> None:
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    image = tv_tensors.Image(torch.zeros(3, 30, 30, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.zeros(30, 30).long())
    with caplog.at_level(logging.WARNING):
        x, y = PasteObjects(src, ["background", "cat"], count=(2, 2), size=(10, 10))(image, mask)
    assert torch.equal(y, mask) and torch.equal(x, image)
    assert "broken.jpg" in caplog.text and "unreadable" in caplog.text


def test_paste_source_errors_are_one_line(tmp_path) -> None:
    names = ["background", "cat"]
    with pytest.raises(SegDataError, match="not found"):
        PasteObjects(tmp_path / "none", names)
    src = _paste_source(tmp_path / "src", {"cat": (250, 0, 0), "zebra": (0, 0, 0)})
    with pytest.raises(SegDataError, match="folder\\(s\\) zebra name no class"):
        PasteObjects(src, names)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(SegDataError, match="no images"):
        PasteObjects(tmp_path / "empty", names)
    with pytest.raises(SegDataError, match="use ellipse or box"):
        PasteObjects(src, ["background", "cat", "zebra"], shape="star")
    with pytest.raises(SegDataError, match="min <= max"):
        PasteObjects(src, ["background", "cat", "zebra"], count=(3, 1))


def test_dataset_reads_pairs_and_eval_keeps_mask_size(tmp_path) -> None:
    image, mask = _square_pair()
    _write_pair(tmp_path, "val", "a", image, mask)
    ds = SegmentationFolder(tmp_path, "val", 3, eval_transform((45, 60)))
    x, y = ds[0]
    assert x.shape == (3, 45, 60) and y.shape == (90, 120)
    assert int((y == 2).sum()) == 40 * 70


def test_reduce_zero_label(tmp_path) -> None:
    image, mask = _square_pair()
    mask[0, 0] = 1
    _write_pair(tmp_path, "val", "a", image, mask)
    ds = SegmentationFolder(tmp_path, "val", 2, reduce_zero_label=True)
    _, y = ds[0]
    assert int(y[0, 0]) == 0 and int(y[30, 40]) == 1 and int(y[5, 5]) == 255


def test_image_without_mask_is_skipped_and_counted(tmp_path) -> None:
    image, mask = _square_pair()
    _write_pair(tmp_path, "train", "a", image, mask)
    _write_pair(tmp_path, "train", "b", image, None)
    ds = SegmentationFolder(tmp_path, "train", 3)
    assert len(ds) == 1 and ds.unlabelled == 1


def test_mask_of_other_size_is_one_clear_error(tmp_path) -> None:
    image, mask = _square_pair()
    _write_pair(tmp_path, "train", "a", image, mask[:-2])
    with pytest.raises(SegDataError, match="same size"):
        SegmentationFolder(tmp_path, "train", 3)


def test_label_beyond_classes_is_one_clear_error(tmp_path) -> None:
    image, mask = _square_pair()
    mask[0, 0], mask[1, 1] = 255, 7
    _write_pair(tmp_path, "train", "a", image, mask)
    with pytest.raises(SegDataError, match=r"values \[7\]"):
        SegmentationFolder(tmp_path, "train", 3)
    assert len(SegmentationFolder(tmp_path, "train", 8)) == 1  # 255 is the ignore index, not a class


def test_voc_layout(tmp_path) -> None:
    image, mask = _square_pair()
    for d in ["JPEGImages", "SegmentationClass", "ImageSets/Segmentation"]:
        (tmp_path / d).mkdir(parents=True)
    Image.fromarray(image).save(tmp_path / "JPEGImages" / "2007_000001.jpg")
    palette = Image.fromarray(mask, mode="L").convert("P")
    palette.save(tmp_path / "SegmentationClass" / "2007_000001.png")
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("2007_000001\n")
    ds = SegmentationFolder(tmp_path, "val", 21)
    assert ds.layout == "voc" and int((ds[0][1] == 2).sum()) == 40 * 70


# --- metrics and inference ------------------------------------------------------------------------------
def test_miou_hand_made() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    s = cm.scores()
    # class 0: inter 1, union 1+2+... -> tp 1, fn 1 (pred 1), fp 1 (a 2 predicted 0) -> 1/3
    # class 1: tp 2, fp 1 -> 2/3; class 2: tp 1, fn 1 -> 1/2; class 3 absent: NaN, left out
    assert s["per_class_iou"]["0"] == pytest.approx(100 / 3)
    assert s["per_class_iou"]["1"] == pytest.approx(200 / 3)
    assert s["per_class_iou"]["2"] == pytest.approx(50)
    assert s["per_class_iou"]["3"] is None
    assert s["miou"] == pytest.approx((100 / 3 + 200 / 3 + 50) / 3)
    assert s["pixel_acc"] == pytest.approx(100 * 4 / 6) and s["pixels"] == 6


def test_miou_perfect_and_accumulated() -> None:
    cm = ConfusionMatrix(3)
    a = torch.tensor([[0, 1], [2, 2]])
    cm.update(a, a)
    assert cm.scores()["miou"] == 100.0
    cm.update(torch.zeros_like(a), a)  # all predicted 0
    iou = cm.per_class_iou()
    assert iou[0] == pytest.approx(2 / 5) and iou[1] == pytest.approx(1 / 2) and iou[2] == pytest.approx(2 / 4)


def test_sliding_window_equals_whole_image_when_one_window_covers_it() -> None:
    model = create_segmenter("semantic_fpn", "lowformer_b0", 4).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = infer(model, x, mode="whole")
        slide = infer(model, x, mode="slide", crop=(128, 128), stride=(85, 85))
        exact = infer(model, x, mode="slide", crop=(64, 96), stride=(32, 32))
    assert torch.equal(whole, slide) and torch.equal(whole, exact)


def test_sliding_window_averages_overlaps() -> None:
    class Ramp(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1] + x.shape[-1]  # depends on the window width, to see the averaging

    x = torch.zeros(1, 3, 4, 10)
    out = slide_inference(Ramp(), x, crop=(4, 6), stride=(4, 4))
    # windows at x 0..6 and 4..10 (the last shifted to the border): both of width 6
    assert torch.allclose(out, torch.full((1, 1, 4, 10), 6.0))
    assert not math.isnan(float(out.sum()))


def test_flip_test_averages_the_mirror_images_logits() -> None:
    class Column(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # class 0 scores the column index, class 1 the pixel value: not mirror-symmetric, unlike class 1
            cols = torch.arange(x.shape[-1], dtype=x.dtype).expand(x.shape[0], 1, x.shape[-2], -1)
            return torch.cat([cols, x[:, :1]], 1)

    x = torch.rand(1, 3, 2, 5)
    plain, flipped = infer(Column(), x), infer(Column(), x, flip=True)
    assert torch.equal(plain[:, 0], torch.arange(5.0).expand(1, 2, 5))
    assert torch.allclose(flipped[:, 0], torch.full((1, 2, 5), 2.0))  # (j + (4 - j)) / 2 everywhere
    assert torch.equal(flipped[:, 1], x[:, 0])  # the mirrored-back pixel scores are the image's own
    slide = infer(Column(), x, mode="slide", crop=(2, 5), stride=(1, 1), flip=True)
    assert torch.equal(slide, flipped)


def test_onnx_export_matches_pytorch(tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from lowformer.deploy.onnx import export_onnx
    torch.manual_seed(0)
    model = create_segmenter("semantic_fpn", "lowformer_b0", 5).eval()
    x = torch.randn(1, 3, 80, 96)  # not a multiple of 32 in height: the padding is exported too
    result = export_onnx(model, tmp_path / "seg.onnx", x)
    assert (tmp_path / "seg.onnx").is_file() and result["rel_diff"] < 1e-4


def test_models_and_bench_accept_segmenters(capsys) -> None:
    import json

    from lowformer.bench.complexity import count_macs
    from lowformer.bench.featured import build_model
    from lowformer.cli import main
    assert main(["models", "segformer:lowformer_b0", "--image-size", "64", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    model = create_segmenter("segformer", "lowformer_b0", 150)
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["macs"] == count_macs(model, (3, 64, 64))
    assert build_model("segformer:lowformer_b0").num_classes == 150


def test_encoder_checkpoint_matches_feature_extractor_of_the_classifier(tmp_path) -> None:
    import lowformer
    torch.manual_seed(2)
    classifier = lowformer.create_model("edgeformer_xs", num_classes=10)
    with torch.no_grad():
        for p in classifier.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "cls.pt"
    torch.save(classifier.state_dict(), path)
    model = create_segmenter("segformer", "edgeformer_xs", 3, checkpoint_path=path).eval()
    reference = lowformer.create_model("edgeformer_xs", features_only=True, checkpoint_path=path, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = model.net.encoder.model(x), reference(x)
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
