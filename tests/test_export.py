"""``lowformer export``: a verified ONNX file, a loud failure when outputs diverge, int8 from real images."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lowformer
from lowformer.cli import main
from lowformer.deploy.check import DeployMismatchError
from lowformer.deploy.onnx import OrtModule, check_onnx, export_onnx

IMAGES = Path(os.environ.get(
    "LOWFORMER_IMAGENET_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")) / "val"


def test_export_deploy_graph_matches_pytorch(tmp_path, capsys):
    out = tmp_path / "b0.onnx"
    assert main(["export", "lowformer_b0", "--deploy", "--image-size", "64", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    import onnx
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "BatchNormalization" not in ops and "ConvTranspose" in ops  # stride-2 upsampling stays transposed
    assert OrtModule(out)(torch.randn(3, 3, 64, 64)).shape == (3, 1000)  # dynamic batch


def test_check_fails_loudly_and_removes_the_file_on_divergence(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, x)["rel_diff"] < 1e-5
    with pytest.raises(DeployMismatchError, match="diverges"):
        check_onnx(path, other, [x])
    assert not path.exists()


def test_int8_export_needs_calibration_images(tmp_path, capsys):
    out = tmp_path / "q.onnx"
    assert main(["export", "test_efficientnet", "--precision", "int8", "--out", str(out)]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert main(["export", "test_efficientnet", "--precision", "int8", "--calibration", str(tmp_path),
                 "--out", str(out)]) == 2
    assert "no images" in capsys.readouterr().err and not out.exists()


@pytest.mark.skipif(not IMAGES.is_dir(), reason="needs the shared imagenet-sample images")
def test_int8_export_from_real_images(tmp_path):
    out = tmp_path / "q.onnx"
    assert main(["export", "test_efficientnet", "--precision", "int8", "--calibration", str(IMAGES),
                 "--calibration-count", "8", "--image-size", "64", "--out", str(out)]) == 0
    import onnx
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_export_loads_the_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = lowformer.create_model("test_efficientnet").eval()
    ckpt, out = tmp_path / "w.pth", tmp_path / "w.onnx"
    torch.save(model.state_dict(), ckpt)
    assert main(["export", "test_efficientnet", "--checkpoint", str(ckpt), "--image-size", "64", "--out", str(out)]) == 0
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(OrtModule(out)(x), model(x), atol=1e-4)
