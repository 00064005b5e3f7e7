"""The benchmark harness: timing protocol, backends and their output checks, parallel jobs, records, profile.

Timings are never asserted: the protocol is checked with a fake clock, everything else by invariants."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

from lowformer.bench.profile import profile_model
from lowformer.bench.runner import BenchConfig, resolve, run_benchmark, run_jobs
from lowformer.bench.timing import interleave, measure, merge, summarize
from lowformer.deploy.backends import OutputMismatchError, prepare
from lowformer.errors import LowformerError

TINY = "test_convnext"  # timm's 0.27 M-parameter test network


class FakeClock:
    """A clock that only moves when the timed function runs: each call advances it by the next step."""

    def __init__(self, steps: list[float]):
        self.now, self.steps, self.calls = 0.0, list(steps), 0

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.now += self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1


def test_fixed_iterations_time_each_pass_after_the_warmup():
    clock = FakeClock([1.0, 1.0, 1.0, 0.001, 0.002, 0.003, 0.004, 0.010])
    m = measure(clock.fn, warmup=3, iterations=5, clock=clock)
    assert clock.calls == 8
    t = summarize(m)
    assert t["samples"] == 5 and t["calls_per_sample"] == 1
    assert t["median_ms"] == pytest.approx(3.0) and t["min_ms"] == pytest.approx(1.0)
    assert t["mean_ms"] == pytest.approx(4.0)


def test_autorange_excludes_warmup_and_merge_joins_rounds():
    clock = FakeClock([5.0, 5.0, 0.01])
    m = measure(clock.fn, warmup=2, min_run_time=0.05, clock=clock)
    assert summarize(m)["median_ms"] == pytest.approx(10.0) and summarize(m)["min_ms"] == pytest.approx(10.0)
    clock2 = FakeClock([0.02])
    m2 = measure(clock2.fn, warmup=0, iterations=3, clock=clock2)
    merged = summarize(merge([m, m2]))
    assert merged["samples"] == len(m.times) + 3 and merged["min_ms"] == pytest.approx(10.0)


def test_record_schema_and_backends_match_eager():
    config = BenchConfig([TINY], batch_size=2, image_sizes=[32], iterations=2, warmup=1,
                         backends=["eager", "channels_last", "torchscript"], threads=[1])
    records = run_benchmark(config)
    assert [r["backend"] for r in records] == ["eager", "channels_last", "torchscript"]
    params = sum(p.numel() for p in timm.create_model(TINY).parameters())
    for r in records:
        assert {"model", "backend", "mode", "batch_size", "image_size", "device", "threads", "torch_version",
                "median_ms", "min_ms", "images_per_s", "params", "macs", "load_avg_1m"} <= set(r)
        assert (r["model"], r["mode"], r["batch_size"], r["image_size"], r["threads"]) == (TINY, "throughput", 2, 32, 1)
        assert r["torch_version"] == torch.__version__ and r["samples"] == 2
        assert r["images_per_s"] == pytest.approx(2 * 1000 / r["median_ms"])
        assert r["min_ms"] <= r["median_ms"] and r["params"] == params and r["macs"] > 0
        assert r["max_abs_diff"] < 1e-4


class _Head(nn.Module):
    def __init__(self, diverge: bool = False):
        super().__init__()
        self.conv, self.fc, self.diverge = nn.Conv2d(3, 8, 3), nn.Linear(8, 4), diverge

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.conv(x).mean((2, 3)))
        return y * 2 if self.diverge and torch.onnx.is_in_onnx_export() else y


def test_onnx_export_is_checked_cached_and_keyed(tmp_path):
    torch.manual_seed(0)
    model, x = _Head().eval(), torch.randn(2, 3, 16, 16)
    p = prepare(model, "onnxruntime", x, opset=17, cache_key="head", cache_dir=tmp_path)
    assert 0 <= p.max_abs_diff < 1e-5
    files = list(tmp_path.glob("head_16x16_opset17_*.onnx"))
    assert len(files) == 1 and p.info["onnx_file"] == files[0].name  # no machine path in a record
    with torch.inference_mode():
        expected = model(x)
    assert torch.allclose(torch.from_numpy(p.run()), expected, atol=1e-5)
    mtime = files[0].stat().st_mtime_ns
    prepare(model, "onnxruntime", x, opset=17, cache_key="head", cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime
    prepare(model, "onnxruntime", x, opset=16, cache_key="head", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("head_16x16_*.onnx"))) == 2


def test_onnx_cache_is_not_reused_by_other_code(tmp_path, monkeypatch):
    """A cached export made by other lowformer code (say, before a deploy pass changed) is not reused, and the
    new export replaces it; another input size of the same model stays."""
    from lowformer.deploy import backends
    model, x = _Head().eval(), torch.randn(1, 3, 16, 16)
    prepare(model, "onnxruntime-deploy", x, cache_key="head", cache_dir=tmp_path)
    prepare(model, "onnxruntime-deploy", torch.randn(1, 3, 24, 24), cache_key="head", cache_dir=tmp_path)
    first, other_size = sorted(tmp_path.glob("head_deploy_*.onnx"))
    assert first.stem.startswith("head_deploy_16x16") and first.stem.endswith("_" + backends._code_digest())
    monkeypatch.setattr(backends, "_code_digest", lambda: "0a1b2c3d")
    prepare(model, "onnxruntime-deploy", x, cache_key="head", cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.glob("head_deploy_*.onnx")) == [
        first.name.replace(first.stem.rsplit("_", 1)[1], "0a1b2c3d"), other_size.name]


def test_onnx_export_that_diverges_is_refused(tmp_path):
    model, x = _Head(diverge=True).eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(OutputMismatchError, match="diverges from the eager model"):
        prepare(model, "onnxruntime", x, cache_key="bad", cache_dir=tmp_path)


def test_amp_runs_under_autocast_and_is_refused_for_onnx(tmp_path):
    model, x = _Head().eval(), torch.randn(1, 3, 16, 16)
    p = prepare(model, "eager", x, amp="bf16")
    assert p.run().dtype == torch.bfloat16
    with pytest.raises(LowformerError, match="--amp"):
        prepare(model, "onnxruntime", x, amp="bf16", cache_dir=tmp_path)


def test_two_jobs_report_per_process_and_aggregate():
    config = BenchConfig([TINY], mode="latency", image_sizes=[32], iterations=3, warmup=1, jobs=2)
    records = run_jobs(config)
    assert [r["job"] for r in records] == [0, 1, "all"]
    per_job, agg = records[:2], records[2]
    assert all(r["batch_size"] == 1 and r["jobs"] == 2 and r["samples"] == 3 for r in per_job)
    assert agg["median_ms"] == pytest.approx((per_job[0]["median_ms"] + per_job[1]["median_ms"]) / 2)
    assert agg["images_per_s"] == pytest.approx(per_job[0]["images_per_s"] + per_job[1]["images_per_s"])
    assert agg["min_ms"] == min(r["min_ms"] for r in per_job) and agg["samples"] == 6


def test_profile_stages_add_up_to_the_total():
    r = profile_model(TINY, image_size=32, iterations=2, warmup=1, row_limit=5)
    stages = [s["stage"] for s in r["stages"]]
    assert stages[0] == "stem" and "stages.0" in stages and stages.index("stages.0") < stages.index("head")
    assert sum(s["macs"] for s in r["stages"]) == r["macs"] > 0
    assert all(s["median_ms"] >= 0 for s in r["stages"])
    assert "Self CPU" in r["operator_table"] and "aten::" in r["operator_table"]


@pytest.mark.slow
def test_compile_backend_matches_eager():
    config = BenchConfig([TINY], batch_size=1, image_sizes=[32], iterations=2, warmup=1, backends=["compile"])
    (r,) = run_benchmark(config)
    assert r["backend"] == "compile" and r["max_abs_diff"] < 1e-4


def test_deploy_backends_are_timed_and_checked():
    """``--backend deploy`` runs lowformer.deploy's graph; its output equals eager's and the passes are recorded."""
    model = timm.create_model("resnet18", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    prepared = prepare(model, "deploy", x)
    with torch.inference_mode():
        torch.testing.assert_close(prepared.run(), model(x), rtol=1e-4, atol=1e-4)
    assert prepared.max_abs_diff < 1e-3 and "conv_bn" in prepared.info["deploy_passes"]
    with pytest.raises(LowformerError, match="--amp"):
        prepare(model, "deploy", x, amp="bf16")


def test_deploy_form_of_a_model_with_a_submodule_named_fuse():
    """EdgeFormer has a submodule called ``fuse``: timm's reparameterize walk would call it as a method."""
    from lowformer.bench.featured import build_model
    training_form, deployed_form = build_model("edgeformer_xs", deploy=False), build_model("edgeformer_xs")
    x = torch.randn(1, 3, 128, 128)
    with torch.inference_mode():
        assert torch.equal(training_form(x), deployed_form(x))


def test_duration_timing_takes_at_least_min_samples():
    """A 0.4 s pass and one second of timing gave 2-3 samples (too few for quartiles): blocks are added until the
    minimum is reached."""
    clock = FakeClock([0.4])
    m = measure(clock.fn, warmup=0, min_run_time=1.0, min_samples=10, clock=clock)
    t = summarize(m)
    assert t["samples"] >= 10 and t["median_ms"] == pytest.approx(400.0) and not t["noisy"]


def test_interleave_measures_every_candidate_once_per_round_in_order():
    order = []
    fns = {name: (lambda: None) for name in "abc"}
    out = interleave(fns, threads={"a": 1, "b": 2, "c": 1}, rounds=2, warmup=0, iterations=3, before=order.append)
    assert order == list("abcabc") and all(len(m.times) == 6 for m in out.values())


def test_jobs_share_out_the_threads_and_imply_latency(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    config = resolve(BenchConfig([TINY], jobs=2))
    assert (config.threads, config.mode, config.batch_size) == ([4], "latency", 1)
    assert resolve(BenchConfig([TINY], jobs=3)).threads == [2]
    assert resolve(BenchConfig([TINY], jobs=16)).threads == [1]
    assert resolve(BenchConfig([TINY], jobs=2, threads=[3])).threads == [3]  # given threads are kept
    assert resolve(BenchConfig([TINY])).threads == [8] and resolve(BenchConfig([TINY])).mode == "throughput"


def test_onnxruntime_deploy_thread_sweep_creates_one_session_per_thread_count(tmp_path):
    """The sweep used to reuse the first session for every thread count (only the plain onnxruntime backend was
    re-prepared): the 2-thread row ran on one thread."""
    config = BenchConfig([TINY], batch_size=1, image_sizes=[32], iterations=1, warmup=0, threads=[1, 2],
                         backends=["onnxruntime-deploy", "onnxruntime", "eager"], onnx_cache=str(tmp_path))
    records = run_benchmark(config)
    ort = [(r["backend"], r["threads"], r["session_threads"]) for r in records if "session_threads" in r]
    assert sorted(ort) == [("onnxruntime", 1, 1), ("onnxruntime", 2, 2), ("onnxruntime-deploy", 1, 1),
                           ("onnxruntime-deploy", 2, 2)]
    assert sorted(r["threads"] for r in records if r["backend"] == "eager") == [1, 2]


def test_every_backend_that_owns_its_threads_is_an_onnx_session():
    from lowformer.deploy.backends import BACKENDS
    assert {b.name for b in BACKENDS.values() if b.owns_threads} >= {"onnxruntime", "onnxruntime-deploy",
                                                                    "onnxruntime-int8"}
    assert all(b.opset == 18 for b in BACKENDS.values() if b.opset is not None)
    assert {b.name for b in BACKENDS.values() if b.lossy} >= {"deploy-bf16", "onnxruntime-int8"}


def test_backends_are_refused_on_devices_they_do_not_run_on():
    from lowformer.deploy.backends import check_device
    for name in ("openvino", "openvino-deploy-int8", "onnxruntime-int8"):
        with pytest.raises(LowformerError, match=f"the {name} backend runs on cpu, not cuda: use --device cpu"):
            check_device(torch.device("cuda"), name)
    for name in ("cuda-graphs", "tensorrt"):
        with pytest.raises(LowformerError, match=f"the {name} backend runs on cuda, not cpu"):
            prepare(nn.Conv2d(3, 4, 3), name, torch.randn(1, 3, 8, 8))
    for name in ("eager", "channels_last", "compile", "onnxruntime", "deploy"):
        check_device(torch.device("cuda"), name)
        check_device(torch.device("cpu"), name)


def test_tensorrt_without_torch_tensorrt_names_the_package(monkeypatch):
    import sys

    from lowformer.deploy.backends import BACKENDS, BackendOptions
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)  # not installed, wherever this runs
    with pytest.raises(LowformerError, match="needs torch-tensorrt built for this torch .*pip install torch-tensorrt"):
        BACKENDS["tensorrt"].prepare(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), 1, BackendOptions())


def test_a_backend_name_is_registered_once():
    from lowformer.deploy.backends import BACKENDS, Backend, register_backend
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Backend("eager", BACKENDS["eager"].prepare))


@pytest.mark.parametrize("field, value, flag", [
    ("batch_size", 0, "--batch-size"), ("batch_size", -2, "--batch-size"), ("image_sizes", [0], "--image-size"),
    ("image_sizes", [], "--image-size"), ("threads", [0], "--threads"), ("threads", [], "--threads"),
    ("iterations", 0, "--iterations"), ("warmup", -1, "--warmup"), ("rounds", 0, "--rounds"), ("jobs", 0, "--jobs"),
    ("min_run_time", 0.0, "--min-time"), ("min_samples", 0, "--min-samples"), ("opset", 3, "opset"),
    ("device", "gpu", "device"), ("device", "cuda:7", "device"), ("backends", ["tensorrt"], "backend"),
    ("mode", "fast", "mode"), ("amp", "fp8", "--amp"), ("models", [], "no model"),
])
def test_every_setting_is_range_checked_before_any_work(field, value, flag, monkeypatch):
    import lowformer.bench.runner as runner
    monkeypatch.setattr(runner, "build_model", lambda *a, **k: pytest.fail("work started before the check"))
    with pytest.raises(LowformerError, match=flag) as info:
        run_benchmark(BenchConfig(**{"models": [TINY], field: value}))
    assert "\n" not in str(info.value)


def test_committed_results_carry_no_machine_paths():
    from pathlib import Path
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    for f in results.iterdir():
        if f.suffix in (".json", ".csv", ".md"):
            text = f.read_text()
            for root in ("/home/", "/root/", "/Users/", "/tmp/", "/work/"):
                assert root not in text, f"{f.name} holds a machine path under {root}"
