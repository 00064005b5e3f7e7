"""Detectors and segmenters by ARCH:BACKBONE name in `lowformer models`, `lowformer bench` and `lowformer export`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowformer.bench.complexity import count_costs, count_macs, model_complexity
from lowformer.dense import (
    cost_module,
    dense_model_from_spec,
    dense_test_size,
    parse_dense_spec,
)
from lowformer.errors import LowformerError

ROOT = Path(__file__).parents[1]


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowformer", *args], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"},
                          timeout=timeout)


def test_specs_name_detectors_and_segmenters_and_nothing_else():
    assert parse_dense_spec("retinanet:lowformer_b0").task == "detection"
    assert parse_dense_spec("mask_rcnn:visformer_small_v2").backbone == "visformer_small_v2"
    assert parse_dense_spec("upernet:dwnet_tiny").task == "segmentation"
    for name in ("lowformer_b0", "hf-hub:timm/resnet18", "retinanet:a:b"):
        assert parse_dense_spec(name) is None


class _Toy(nn.Module):
    """One of each kind mmcv's counter prices differently from the project's."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn, self.relu, self.gelu = nn.BatchNorm2d(8), nn.ReLU(), nn.GELU()
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.gelu(self.relu(self.bn(self.conv(x))))
        v = self.pool(y).flatten(1)
        return self.fc(v) + v @ v.T, self.up(y)


def test_mmcv_convention_against_hand_counts():
    # 1 x 3 x 8 x 8 input. Project: conv 64 x 8 x 27, transposed conv at its 64 input positions x 8 x 2 x 4,
    # linear 8 x 4, the 1x8 @ 8x1 matmul 8. mmcv: convs add a bias op per output, BN 2 per element (affine),
    # ReLU and pooling 1 per element, no matmul, no GELU.
    macs, mmcv = count_costs(_Toy(), (3, 8, 8))
    assert macs == 64 * 8 * 27 + 64 * 8 * 2 * 4 + 32 + 8
    assert mmcv == (64 * 8 * 27 + 64 * 8) + (64 * 8 * 2 * 4 + 256 * 2) + 32 + 2 * 512 + 512 + 512


def test_retinanet_cost_is_backbone_fpn_and_head():
    """The counted pass is the model's neck plus torchvision's RetinaNet head: 4 shared 3x3 convs per branch and
    the two predictors, on P3-P7, priced by hand."""
    size = 64
    rec = model_complexity("retinanet:lowformer_b0", image_size=size)
    det = dense_model_from_spec("retinanet:lowformer_b0")
    neck = count_macs(det.model.backbone, (3, size, size))
    c, anchors = 256, 9
    head = sum((-(-size // s)) ** 2 * c * 9 * (8 * c + anchors * 80 + anchors * 4) for s in (8, 16, 32, 64, 128))
    assert rec["macs"] == neck + head and rec["image_size"] == rec["image_width"] == size
    assert rec["params"] == sum(p.numel() for p in det.parameters())
    assert rec["mmcv_flops"] > 0


def test_dense_test_sizes_follow_the_presets():
    assert dense_test_size(dense_model_from_spec("retinanet:lowformer_b0")) == (800, 1333)
    assert dense_test_size(dense_model_from_spec("ssdlite:edgeformer_s")) == (320, 320)
    assert dense_test_size(dense_model_from_spec("semantic_fpn:lowformer_b0")) == (512, 512)
    assert dense_test_size(nn.Linear(2, 2)) is None


def test_models_cli_prints_both_conventions():
    r = _cli("models", "ssdlite:edgeformer_s", "--image-size", "64", "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)[0]
    assert rec["model"] == "ssdlite:edgeformer_s" and rec["image_size"] == 64 and rec["mmcv_flops"] > 0
    table = _cli("models", "ssdlite:edgeformer_s", "--image-size", "64")
    assert "mmcv FLOPs (M)" in table.stdout and f"{rec['mmcv_flops'] / 1e6:.1f}" in table.stdout


def test_bench_times_a_detector_at_the_given_size_and_refuses_tracing_backends():
    from lowformer.bench.runner import BenchConfig, resolve, run_benchmark
    rec, = run_benchmark(BenchConfig(["fcos:lowformer_b0"], batch_size=2, image_sizes=[64], iterations=1, warmup=0,
                                     threads=[1]))
    det = dense_model_from_spec("fcos:lowformer_b0")
    det.set_test_size(64, 64)
    assert rec["image_size"] == rec["image_width"] == 64 and rec["batch_size"] == 2
    assert rec["macs"] == count_macs(cost_module(det), (3, 64, 64))
    with pytest.raises(LowformerError, match="detectors are timed with the eager or channels_last backend"):
        resolve(BenchConfig(["retinanet:lowformer_b0"], backends=["onnxruntime"]))


def _onnx_outputs(path: Path, x: torch.Tensor) -> list:
    import onnxruntime as ort
    return ort.InferenceSession(str(path)).run(None, {"input": x.numpy()})


def test_detector_onnx_export_matches_pytorch_where_detections_are_stable(tmp_path):
    """Classification weights spread out (std 1), so FCOS scores the bundled photo's boxes far apart: detections
    whose order rounding cannot change. The file's boxes/scores/labels equal PyTorch's on that photo."""
    from torchvision.transforms.v2 import functional as F

    from lowformer.data import bundled_image, load_image
    torch.manual_seed(0)
    det = dense_model_from_spec("fcos:lowformer_b0", num_classes=3).eval()
    with torch.no_grad():
        det.model.head.classification_head.cls_logits.weight.normal_(0, 1.0)
    torch.save(det.state_dict(), tmp_path / "evalmodel.pt")
    out = tmp_path / "det.onnx"
    r = _cli("export", "fcos:lowformer_b0", "--checkpoint", str(tmp_path / "evalmodel.pt"), "--image-size", "96",
             "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "detections compared" in r.stdout
    det.set_test_size(96, 96)
    photo = F.to_dtype(F.pil_to_tensor(load_image(bundled_image())), torch.float32, scale=True)
    x = F.resize(photo, [96, 96], antialias=True).unsqueeze(0)
    with torch.no_grad():
        ref = det([x[0]])[0]
    boxes, scores, labels = _onnx_outputs(out, x)
    assert len(ref["scores"]) > 10 and labels.shape == ref["labels"].shape
    assert (torch.from_numpy(labels) == ref["labels"]).all()
    torch.testing.assert_close(torch.from_numpy(scores), ref["scores"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(boxes), ref["boxes"], rtol=1e-4, atol=1e-3)


def test_segmenter_onnx_export_matches_pytorch(tmp_path):
    """A segmenter's weights (class count read from them) exported; the file's logits equal PyTorch's on a batch
    of two, the batch axis being dynamic."""
    torch.manual_seed(0)
    seg = dense_model_from_spec("semantic_fpn:lowformer_b0", num_classes=5).eval()
    torch.save(seg.state_dict(), tmp_path / "evalmodel.pt")
    out = tmp_path / "seg.onnx"
    r = _cli("export", "semantic_fpn:lowformer_b0", "--checkpoint", str(tmp_path / "evalmodel.pt"), "--image-size",
             "64", "--out", str(out))
    assert r.returncode == 0, r.stderr
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = seg(x)
    logits = torch.from_numpy(_onnx_outputs(out, x)[0])
    assert logits.shape == (2, 5, 64, 64)
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("flags", [["--precision", "int8"], ["--deploy"], ["--format", "openvino"]])
def test_detector_export_refuses_other_paths_before_any_work(tmp_path, flags):
    out = tmp_path / ("det.xml" if "openvino" in flags else "det.onnx")
    out.write_text("keep")
    r = _cli("export", "retinanet:lowformer_b0", *flags, "--out", str(out))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "detectors export as fp32 ONNX only" in r.stderr and out.read_text() == "keep"
