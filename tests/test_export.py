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
    torch.manual_seed(0)  # a random-weight toy model reaches ~0.98 cosine: below the default gate, so lower it
    assert main(["export", "test_efficientnet", "--precision", "int8", "--calibration", str(IMAGES),
                 "--calibration-count", "8", "--image-size", "64", "--min-cosine", "0.9", "--out", str(out)]) == 0
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


def test_cpu_has_vnni_reads_the_cpu_flags(tmp_path):
    from lowformer.deploy.onnx import cpu_has_vnni
    avx2, vnni = tmp_path / "avx2", tmp_path / "vnni"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx avx2 fma\n")
    vnni.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_vnni(avx2) and cpu_has_vnni(vnni) and not cpu_has_vnni(tmp_path / "missing")


def test_reduce_range_quantizes_weights_to_seven_bits(tmp_path):
    import onnx
    from onnx import numpy_helper

    from lowformer.deploy.onnx import quantize_int8
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    export_onnx(model, tmp_path / "fp32.onnx", x)

    def weight_range(reduce_range: bool) -> tuple[int, int]:
        out = quantize_int8(tmp_path / "fp32.onnx", tmp_path / f"q{reduce_range}.onnx", torch.randn(8, 3, 12, 12),
                            reduce_range=reduce_range)
        ints = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
        return min(int(w.min()) for w in ints), max(int(w.max()) for w in ints)

    low, high = weight_range(True)
    assert -64 <= low and high <= 64 and high - low > 100  # 7 bits, and the range is used
    low, high = weight_range(False)
    assert low <= -127 or high >= 127  # per-channel 8 bits reach the end of the range


@pytest.mark.skipif(not IMAGES.is_dir(), reason="needs the shared imagenet-sample images")
def test_int8_lowformer_keeps_cosine_on_held_out_real_images(tmp_path):
    """The issue's accuracy target (cosine >= 0.99 to fp32 on real images), on held-out images; on a CPU without
    VNNI the default 7-bit weights are what reaches it (full 8-bit weights saturate the AVX2 kernels)."""
    from lowformer.data import eval_transform, load_image
    from lowformer.deploy.onnx import cpu_has_vnni, deploy_int8
    torch.manual_seed(0)
    model = lowformer.create_model("lowformer_b0").eval()
    transform = eval_transform(model, input_size=(3, 96, 96))
    files = sorted(IMAGES.rglob("*.JPEG"))[:48]
    images = torch.stack([transform(load_image(f)) for f in files])
    calibration, held_out = images[:32], images[32:]
    int8 = lowformer.deploy(model, images[:1], precision="int8", calibration=calibration)
    assert int8.report["check"]["min_cosine"] >= 0.99  # the gate passed on the calibration images
    with torch.inference_mode():
        ref = model(held_out)
        cosine = torch.nn.functional.cosine_similarity(int8(held_out), ref).min().item()
        assert cosine >= 0.99
        if not cpu_has_vnni():
            full = deploy_int8(model, images[:1], calibration, min_cosine=-1.0, reduce_range=False)
            assert torch.nn.functional.cosine_similarity(full(held_out), ref).min().item() < cosine
    with pytest.raises(DeployMismatchError, match="min_cosine"):
        lowformer.deploy(model, images[:1], precision="int8", calibration=calibration, min_cosine=1.0)


def test_a_model_the_exporter_cannot_express_gives_one_line(tmp_path, capfd):
    class InputSizedKernel(torch.nn.Module):  # EdgeFormer-style: the kernel is resized to the input
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 1, 4, 1))

        def forward(self, x):
            w = torch.nn.functional.interpolate(self.weight, size=(x.shape[-2], 1), mode="bilinear")
            return torch.nn.functional.conv2d(x, w, groups=3)

    from lowformer.errors import LowformerError
    path = tmp_path / "m.onnx"
    with pytest.raises(LowformerError, match="cannot be exported to ONNX") as info:
        export_onnx(InputSizedKernel().eval(), path, torch.randn(1, 3, 8, 8))
    assert "\n" not in str(info.value) and not path.exists()
    assert "graph" not in capfd.readouterr().out  # the exporter's graph dump is held back
