"""OpenVINO runtime, NNCF int8, precision="auto", the CPU feature detector and EdgeFormer's input-size folding."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lowformer
from lowformer.cli import main
from lowformer.deploy.check import compare_outputs
from lowformer.errors import LowformerError

pytest.importorskip("openvino")

IMAGES = Path(os.environ.get(
    "LOWFORMER_IMAGENET_SAMPLE", Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample")) / "val"


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so folding is exercised
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _images(n: int = 8, size: int = 32) -> torch.Tensor:
    """Preprocessed real images when the shared sample is here, else smooth random ones."""
    if IMAGES.is_dir():
        from torchvision.transforms import v2

        from lowformer.data import load_image
        files = sorted(p for p in IMAGES.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))[:n]
        tf = v2.Compose([v2.ToImage(), v2.Resize(size), v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        return torch.stack([tf(load_image(f)) for f in files])
    torch.manual_seed(1)
    return nn.functional.interpolate(torch.randn(n, 3, size // 4, size // 4), size=size, mode="bilinear")


# --- CPU features ---------------------------------------------------------------------------------------------

def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo_{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\n"
                    f"flags\t\t: fpu\n")
    return path


def test_cpu_features_read_the_flags_of_the_first_cpu(tmp_path):
    from lowformer.deploy.cpu import cpu_features, cpu_has_vnni
    avx2 = cpu_features(_cpuinfo(tmp_path, "avx avx2 fma"))
    assert (avx2.avx2, avx2.avx512, avx2.vnni, avx2.bf16, avx2.amx) == (True, False, False, False, False)
    assert avx2.isa_class == "AVX2" and avx2.model_name == "Test CPU"
    zen4 = cpu_features(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni avx512_bf16"))
    assert zen4.isa_class == "AVX-512+VNNI+BF16" and cpu_has_vnni(_cpuinfo(tmp_path, "avx2 avx512f avx512_vnni "
                                                                                  "avx512_bf16"))
    amx = cpu_features(_cpuinfo(tmp_path, "avx2 avx512f amx_tile amx_int8 amx_bf16"))
    assert amx.amx and amx.vnni and amx.bf16  # AMX-INT8 / AMX-BF16 are VNNI-class and bf16 instructions
    # the speed-relevant flags every timing records, in a fixed order, without the others
    assert zen4.flags == ("avx2", "avx512f", "avx512_vnni", "avx512_bf16") and avx2.flags == ("avx2",)
    assert amx.flags == ("avx2", "avx512f", "amx_bf16", "amx_int8")
    assert not cpu_features(tmp_path / "missing").avx2


def test_int8_weight_range_follows_vnni():
    """8-bit weights where the CPU has VNNI, 7-bit only where it does not: one detector decides."""
    import inspect

    from lowformer.deploy import onnx
    from lowformer.deploy.cpu import cpu_has_vnni
    assert onnx.cpu_has_vnni is cpu_has_vnni
    assert "reduce_range = not cpu_has_vnni()" in inspect.getsource(onnx.quantize_int8)


# --- EdgeFormer folding ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["edgeformer_xs", "edgeformer_s",
                                  pytest.param("edgeformer_h", marks=pytest.mark.slow)])
def test_edgeformer_exports_to_onnx_and_openvino(name, tmp_path):
    from lowformer.deploy.onnx import OrtModule, export_onnx
    from lowformer.deploy.openvino import deploy_openvino
    torch.manual_seed(0)
    model = lowformer.create_model(name).eval()
    x = torch.randn(1, 3, 96, 96)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, x, reference=model)  # raises beyond 1e-4 relative
    import onnx
    assert "Conv" in {n.op_type for n in onnx.load(str(path)).graph.node}
    x2 = torch.randn(2, 3, 96, 96)
    assert compare_outputs(model, OrtModule(path), [x2])["rel_diff"] <= 1e-4
    ov = deploy_openvino(model, x, "fp32", deploy_graph=False)
    assert compare_outputs(model, ov, [x2])["rel_diff"] <= 1e-4


def test_folding_leaves_the_model_and_keeps_other_sizes_exact():
    from lowformer.deploy.fold import FixedCircularConv, fold_input_size
    torch.manual_seed(0)
    model = lowformer.create_model("edgeformer_xs").eval()
    x, other = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 96, 80)
    folded = fold_input_size(model, x, fixed_size=False)
    assert not any(isinstance(m, FixedCircularConv) for m in model.modules())
    assert any(isinstance(m, FixedCircularConv) for m in folded.modules())
    with torch.no_grad():
        assert torch.equal(folded(x), model(x))
        torch.testing.assert_close(folded(other), model(other), rtol=0, atol=1e-6)
    deployed = lowformer.deploy(model, x)
    assert "fold_input_size" in deployed.report["passes"]
    with torch.no_grad():
        ref = model(other)
        assert (deployed(other) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_export_edgeformer_s_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "es.onnx"
    assert main(["export", "edgeformer_s", "--format", "onnx", "--image-size", "128", "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out


# --- OpenVINO runtime -----------------------------------------------------------------------------------------

def test_openvino_fp32_is_exact_and_bf16_close():
    model, x = _small_net(), _images(4)
    fp32 = lowformer.deploy(model, x[:1], runtime="openvino")
    assert fp32.report["runtime"] == "openvino" and fp32.report["check"]["rel_diff"] <= 1e-4
    assert compare_outputs(model, fp32, [x])["rel_diff"] <= 1e-4  # dynamic batch
    bf16 = lowformer.deploy(model, x[:1], runtime="openvino", precision="bf16")
    assert bf16.report["check"]["min_cosine"] >= 0.99


def test_openvino_int8_needs_and_uses_calibration_images():
    model, images = _small_net(), _images(8)
    with pytest.raises(LowformerError, match="calibration"):
        lowformer.deploy(model, images[:1], runtime="openvino", precision="int8")
    q = lowformer.deploy(model, images[:1], runtime="openvino", precision="int8", calibration=images, min_cosine=0.9)
    assert q.report["calibration_images"] == 8 and q.report["check"]["min_cosine"] >= 0.9
    ops = {op.get_type_name() for op in q.compiled.get_runtime_model().get_ops()}
    assert q.report["check"]["rel_diff"] > 0 and ops  # quantized: not bit-identical to fp32
    with pytest.raises(LowformerError, match="min_cosine"):
        lowformer.deploy(model, images[:1], runtime="openvino", precision="int8", calibration=images, min_cosine=1.0)


def test_openvino_int8_ranges_cover_every_calibration_image():
    # one calibration image with 4x the others' range: min / max activation ranges keep it as exact as the rest,
    # where NNCF's default (means of per-image extremes) clips it to cosine ~0.97
    model, images = _small_net(), _images(16)
    images[0] = images[0] * 4
    q = lowformer.deploy(model, images[:1], runtime="openvino", precision="int8", calibration=images, min_cosine=-1.0)
    with torch.inference_mode():
        cosine = torch.nn.functional.cosine_similarity(q(images), model(images))
    assert cosine.min() >= 0.999


@pytest.mark.slow
def test_openvino_accuracy_aware_int8_meets_its_gate():
    model, images = _small_net(), _images(8)
    q = lowformer.deploy(model, images[:1], runtime="openvino", precision="int8", calibration=images,
                         accuracy_control=True, min_cosine=0.99)
    assert q.report["accuracy_control"] and q.report["check"]["min_cosine"] >= 0.99


def test_deploy_refuses_unknown_runtime_and_misused_accuracy_control():
    model = _small_net()
    with pytest.raises(LowformerError, match="runtime"):
        lowformer.deploy(model, torch.randn(1, 3, 32, 32), runtime="tensorrt")
    with pytest.raises(LowformerError, match="accuracy_control"):
        lowformer.deploy(model, torch.randn(1, 3, 32, 32), accuracy_control=True)


def test_export_openvino_ir_atomically(tmp_path, capsys):
    out = tmp_path / "ir" / "b0.xml"
    assert main(["export", "lowformer_b0", "--format", "openvino", "--image-size", "64", "--out", str(out)]) == 0
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["b0.bin", "b0.xml"]  # no temporary left
    import openvino as ov
    compiled = ov.Core().compile_model(str(out), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = torch.from_numpy(compiled({0: torch.randn(2, 3, 64, 64).numpy()})[0])
    assert got.shape == (2, 1000) and torch.isfinite(got).all()  # dynamic batch
    before = out.read_bytes(), out.with_suffix(".bin").read_bytes()
    capsys.readouterr()
    if IMAGES.is_dir():  # a check that fails after the work: the IR already there stays as it was
        assert main(["export", "lowformer_b0", "--format", "openvino", "--precision", "int8", "--image-size", "64",
                     "--calibration", str(IMAGES), "--calibration-count", "4", "--min-cosine", "1.0",
                     "--out", str(out)]) == 2
        assert "cosine" in capsys.readouterr().err
        assert (out.read_bytes(), out.with_suffix(".bin").read_bytes()) == before
        assert sorted(p.name for p in out.parent.iterdir()) == ["b0.bin", "b0.xml"]


# --- bench backends and precision="auto" ----------------------------------------------------------------------

def test_openvino_backends_in_the_table():
    from lowformer.deploy.backends import get_backend, prepare
    assert get_backend("openvino-int8").lossy and not get_backend("openvino").lossy
    assert get_backend("openvino").owns_threads
    model, x = _small_net(), _images(2)
    prepared = prepare(model, "openvino", x, threads=1)
    assert prepared.check["rel_diff"] <= 1e-3 and prepared.info["graph"] == "plain"
    prepared = prepare(model, "openvino-deploy-int8", x, threads=1, calibration=_images(8))
    assert prepared.info["graph"] == "deploy" and prepared.check["min_cosine"] > 0.9


def test_auto_picks_the_fastest_candidate_that_meets_the_gate():
    model, images = _small_net(), _images(8)
    auto = lowformer.deploy(model, example_input=images[:1], precision="auto", calibration=images)
    report = auto.report
    assert {"runtime", "precision", "candidate", "why", "candidates", "cpu", "threads"} <= set(report)
    cands = report["candidates"]
    measured = {n: c for n, c in cands.items() if "median_ms" in c}
    assert len(measured) >= 3 and report["candidate"] in measured
    passing = [n for n, c in measured.items() if c["cosine"] >= 0.99]
    assert report["candidate"] == min(passing, key=lambda n: measured[n]["median_ms"])
    from lowformer.deploy.cpu import cpu_features
    assert report["cpu"]["isa_class"] == cpu_features().isa_class
    assert ("pytorch-bf16" in cands) == (cpu_features().bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert compare_outputs(model, auto, [images])["min_cosine"] >= 0.99


def test_auto_without_calibration_tries_no_int8_and_refuses_unknown_candidates():
    from lowformer.deploy.auto import deploy_auto
    model, x = _small_net(), _images(2)
    auto = deploy_auto(model, x[:1], candidates=["pytorch-fp32", "openvino-fp32"], rounds=1, min_run_time=0.05)
    assert set(auto.report["candidates"]) == {"pytorch-fp32", "openvino-fp32"}
    assert auto.report["precision"] == "fp32"
    with pytest.raises(LowformerError, match="candidate"):
        deploy_auto(model, x[:1], candidates=["tensorrt-fp8"])
    with pytest.raises(LowformerError, match="calibration"):
        deploy_auto(model, x[:1], candidates=["openvino-int8"])
