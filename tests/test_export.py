"""``lowformer export``: a verified ONNX file, a loud failure when outputs diverge, int8 from real images."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

import lowformer
from lowformer.cli import main
from lowformer.deploy.check import DeployMismatchError
from lowformer.deploy.onnx import OrtModule, check_onnx, export_onnx
from lowformer.errors import LowformerError

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


@pytest.mark.parametrize("deploy", [False, True])
def test_dynamic_size_export_matches_pytorch_at_other_sizes(tmp_path, deploy):
    from lowformer.deploy.onnx import portable_deploy
    model = lowformer.create_model("lowformer_b0").eval()
    x = torch.randn(1, 3, 64, 64)
    graph = portable_deploy(model, x) if deploy else model
    path = tmp_path / "b0.onnx"
    export_onnx(graph, path, x, reference=model, dynamic_size=True)
    ort = OrtModule(path)
    for h, w in ((96, 160), (80, 48), (65, 71)):  # non-square and odd sizes the export was not traced at
        xi = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = model(xi)
        assert torch.allclose(ort(xi), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


class _FixedPositions(torch.nn.Module):
    """A learned position table of the traced size (as ViTs without interpolation have): no dynamic-size graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pos = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Parameter(torch.randn(1, 4, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) + self.pos).mean((2, 3))


def test_dynamic_size_export_of_a_model_tied_to_its_size_fails_in_one_line(tmp_path, capfd):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"keep")
    with pytest.raises(LowformerError, match=r"no dynamic-size ONNX graph \(traced at 16x16, it fails at 48x80") as e:
        export_onnx(_FixedPositions().eval(), path, torch.randn(1, 3, 16, 16), dynamic_size=True)
    assert len(str(e.value).splitlines()) == 1 and "without --dynamic-size" in str(e.value)
    assert path.read_bytes() == b"keep" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert "onnxruntime" not in capfd.readouterr().err  # ONNX Runtime's own error log is held back


def test_dynamic_size_on_the_command_line_and_its_refusals(tmp_path, capsys):
    out = tmp_path / "b0.onnx"
    assert main(["export", "lowformer_b0", "--dynamic-size", "--image-size", "64", "--out", str(out)]) == 0
    assert "dynamic size" in capsys.readouterr().out
    import onnx
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    before = out.read_bytes()
    for args, reason in ((["edgeformer_xs"], "resizes its kernels to the input size"),
                         (["lowformer_b0", "--precision", "int8", "--calibration", str(IMAGES)], "fp32 ONNX exports"),
                         (["lowformer_b0", "--format", "openvino"], "fp32 ONNX exports")):
        target = out if "openvino" not in args else tmp_path / "b0.xml"
        assert main(["export", *args, "--dynamic-size", "--image-size", "64", "--out", str(target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reason in err[0], err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["b0.onnx"]


class _Diverging(torch.nn.Module):
    """Computes something else inside the exporter: its ONNX file cannot match PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(1)
        return y * 2 if torch.onnx.is_in_onnx_export() else y


def test_check_fails_loudly_and_leaves_the_checked_file(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, x)["rel_diff"] < 1e-5
    before = path.read_bytes()
    with pytest.raises(DeployMismatchError, match="diverges"):
        check_onnx(path, other, [x])
    assert path.read_bytes() == before  # checking a file never deletes it


def test_a_failed_export_keeps_the_existing_good_file(tmp_path):
    """Divergent outputs, and an exporter failure: the model.onnx already there survives byte for byte, and no
    temporary file is left beside it."""
    good = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten()).eval()
    x = torch.randn(1, 3, 8, 8)
    path = tmp_path / "model.onnx"
    export_onnx(good, path, x)
    before = path.read_bytes()
    with pytest.raises(DeployMismatchError, match="diverges"):
        export_onnx(_Diverging().eval(), path, x)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    from lowformer.errors import LowformerError
    with pytest.raises(LowformerError, match="opset"):
        export_onnx(good, path, x, opset=3)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    OrtModule(path)(x)  # still the good, loadable file


def test_export_command_failure_keeps_the_users_file(tmp_path, capsys, monkeypatch):
    """A disk that fills up while the exporter writes: one line, the user's file unchanged, nothing left over."""
    import errno

    def full_disk(model, args, f, **kwargs):
        Path(f).write_bytes(b"half an onnx file")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the user's own file")
    monkeypatch.setattr(torch.onnx, "export", full_disk)
    assert main(["export", "test_efficientnet", "--image-size", "32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert out.read_bytes() == b"the user's own file" and [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.skipif(not IMAGES.is_dir(), reason="needs the shared imagenet-sample images")
def test_failed_int8_export_touches_no_user_file_and_leaves_no_temporary_folder(tmp_path, monkeypatch, capsys):
    """``--out q.onnx``: the user's q.onnx and q.fp32.onnx are never touched, whether the export fails (a cosine
    gate no quantization meets) or succeeds, and no temporary folder stays behind."""
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    work = tmp_path / "work"
    work.mkdir()
    (work / "q.onnx").write_bytes(b"an older model")
    (work / "q.fp32.onnx").write_bytes(b"the user's fp32 model")
    args = ["export", "test_efficientnet", "--precision", "int8", "--calibration", str(IMAGES),
            "--calibration-count", "4", "--image-size", "32", "--out", str(work / "q.onnx")]
    assert main(args + ["--min-cosine", "1.0"]) == 2
    assert "cosine" in capsys.readouterr().err
    assert (work / "q.onnx").read_bytes() == b"an older model"
    assert (work / "q.fp32.onnx").read_bytes() == b"the user's fp32 model"
    assert sorted(p.name for p in work.iterdir()) == ["q.fp32.onnx", "q.onnx"] and not list(private.iterdir())
    assert main(args + ["--min-cosine", "-1"]) == 0
    assert (work / "q.fp32.onnx").read_bytes() == b"the user's fp32 model"
    assert (work / "q.onnx").read_bytes() != b"an older model" and not list(private.iterdir())
    assert sorted(p.name for p in work.iterdir()) == ["q.fp32.onnx", "q.onnx"]


def test_deploy_int8_leaves_no_temporary_folder(tmp_path, monkeypatch):
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    x = torch.randn(4, 3, 12, 12)
    int8 = lowformer.deploy(model, x[:1], precision="int8", calibration=x, min_cosine=0.9)
    assert int8(x).shape == (4, 8 * 10 * 10) and int8.path is None
    assert not list(private.iterdir())


def test_int8_backend_writes_the_requested_opset(tmp_path):
    import onnx

    from lowformer.deploy.backends import prepare
    from lowformer.deploy.onnx import deploy_int8
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten()).eval()
    x = torch.randn(4, 3, 12, 12)
    assert prepare(model, "onnxruntime-int8", x, opset=17).info["opset"] == 17
    out = tmp_path / "int8.onnx"
    deploy_int8(model, x[:1], x, out_path=out, min_cosine=0.9, opset=17)
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {17}


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
    assert "\n" not in str(info.value) and not path.exists() and not list(tmp_path.iterdir())  # no temporaries
    assert "graph" not in capfd.readouterr().out  # the exporter's graph dump is held back


@pytest.mark.parametrize("argv, words", [
    (["--opset", "3"], "opset 3"), (["--opset", "40"], "opset 40"), (["--image-size", "0"], "--image-size 0"),
    (["--image-size", "-5"], "--image-size -5"), (["--device", "gpu"], "unknown device 'gpu'"),
    (["--out", "{tmp}/m.txt"], "unknown file type '.txt'"), (["--out", "{tmp}/a_file/m.onnx"], "cannot write in"),
    (["--precision", "int8", "--calibration", "{tmp}", "--calibration-count", "0"], "count 0"),
    (["--precision", "int8", "--calibration", "{tmp}/missing"], "does not exist"),
    (["--precision", "int8", "--calibration", "{tmp}/a_file"], "is a file"),
    (["--calibration", "{tmp}"], "--precision int8"), (["--min-cosine", "2"], "--min-cosine 2"),
    (["--checkpoint", "{tmp}/none.pt"], "no such file"),
])
def test_export_bad_values_fail_in_one_line_before_any_work(argv, words, tmp_path, capsys, monkeypatch):
    import lowformer.models
    monkeypatch.setattr(lowformer.models, "create_model", lambda *a, **k: pytest.fail("work started before the check"))
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "m.onnx")]
    assert main(["export", "test_efficientnet", *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lowformer export: error:") and words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_export_flag_aliases_and_opset(tmp_path):
    from lowformer.cli import build_parser
    args = build_parser().parse_args(["export", "m", "--out", "m.onnx", "--image_size", "32", "--calibration_count",
                                      "5", "--min_cosine", "0.5"])
    assert (args.image_size, args.calibration_count, args.min_cosine, args.opset, args.device) == (32, 5, 0.5, 18, "cpu")
    import onnx
    out = tmp_path / "m.onnx"
    assert main(["export", "test_efficientnet", "--image-size", "32", "--opset", "17", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert {o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")} == {17}


def test_ort_session_profile_records_every_node_of_each_run(tmp_path):
    import json

    from lowformer.deploy.onnx import ort_session
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(1, 3, 16, 16)
    export_onnx(model, tmp_path / "m.onnx", x)
    session = ort_session(tmp_path / "m.onnx", 1, profile_prefix=str(tmp_path / "prof"))
    for _ in range(3):
        session.run(None, {session.get_inputs()[0].name: x.numpy()})
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    assert len(runs) == 3 and kernels and len(kernels) % 3 == 0
    assert all("op_name" in e["args"] and e["dur"] >= 0 for e in kernels)
    assert OrtModule(tmp_path / "m.onnx").session.get_session_options().enable_profiling is False
