"""``lowformer bench`` and ``lowformer profile`` on the command line: the original's flag spellings, outputs."""
from __future__ import annotations

import csv
import json

import pytest
import torch

from lowformer.bench.results import RECORD_FIELDS
from lowformer.cli import main

TINY = "test_convnext"
REQUIRED = {"model", "backend", "mode", "batch_size", "image_size", "device", "threads", "torch_version",
            "median_ms", "min_ms", "images_per_s", "params", "macs"}


def test_bench_original_flags_sweep_and_write_json_csv_plot(tmp_path, capsys):
    out_json, out_csv, plot = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.png"
    code = main(["bench", "--other", TINY, "--image_size", "32", "48", "--batch_size", "2", "--iterations", "2",
                 "--warmup", "1", "--threads", "1", "--optit", "--out", str(out_json), "--out", str(out_csv),
                 "--plot", str(plot)])
    assert code == 0
    table = capsys.readouterr().out
    assert "torchscript" in table and "median ms" in table and "load average at start" in table
    records = json.loads(out_json.read_text())
    assert [(r["backend"], r["image_size"], r["batch_size"]) for r in records] == [("torchscript", 32, 2),
                                                                                 ("torchscript", 48, 2)]
    assert all(REQUIRED <= set(r) for r in records)
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert REQUIRED <= set(rows[0]) and list(rows[0]) == RECORD_FIELDS and len(rows) == 2
    assert float(rows[1]["macs"]) > float(rows[0]["macs"])
    assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_latency_alias_means_batch_one(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["bench", TINY, "--latency", "--image-size", "32", "--iterations", "2", "--warmup", "1",
                 "--threads", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert (r["mode"], r["batch_size"], r["backend"]) == ("latency", 1, "eager")


def test_bench_errors_are_one_line(capsys):
    assert main(["bench", "efficientmodxs_not_a_model_9", "--device", "cpu"]) == 2
    assert main(["bench"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("lowformer bench: error:") for line in err)
    assert "no model given" in err[1]


def test_profile_prints_stages_and_operators(capsys):
    assert main(["profile", TINY, "--image-size", "32", "--iterations", "2", "--threads", "1", "--rows", "5"]) == 0
    out = capsys.readouterr().out
    assert "M MACs" in out and "stages.0" in out and "per operator (torch.profiler)" in out


def _bench_config(argv: list[str]):
    from lowformer.cli import build_parser
    from lowformer.cli.bench import config_from_args
    return config_from_args(build_parser().parse_args(["bench", TINY, *argv]))


@pytest.mark.parametrize("argv, field, expected", [
    (["--batch-size", "3"], "batch_size", 3), (["--batch_size", "3"], "batch_size", 3), (["-b", "3"], "batch_size", 3),
    (["--image-size", "32", "48"], "image_sizes", [32, 48]), (["--image_size", "32"], "image_sizes", [32]),
    (["--img-size", "32"], "image_sizes", [32]), (["--min-time", "0.5"], "min_run_time", 0.5),
    (["--min_time", "0.5"], "min_run_time", 0.5), (["--min-samples", "4"], "min_samples", 4),
    (["--min_samples", "4"], "min_samples", 4), (["--no-deploy"], "deploy", False), (["--no_deploy"], "deploy", False),
    (["--onnx-cache", "c"], "onnx_cache", "c"), (["--onnx_cache", "c"], "onnx_cache", "c"),
    (["--backends", "eager", "deploy"], "backends", ["eager", "deploy"]), (["--optit"], "backends", ["torchscript"]),
    (["--onnxrun", "--optit"], "backends", ["onnxruntime", "torchscript"]), (["--latency"], "mode", "latency"),
    (["--cpu"], "device", "cpu"), (["--gpu", "1"], "device", "cuda:1"), (["--device", "cpu"], "device", "cpu"),
    (["--testrun"], "mode", "throughput"), (["--testrun", "--latency"], "mode", "latency"),
    (["--opset", "17"], "opset", 17), ([], "opset", 18), ([], "threads", None), (["--threads", "1", "2"], "threads", [1, 2]),
    (["--jobs", "2"], "jobs", 2),
])
def test_bench_flag_spellings_map_to_the_same_setting(argv, field, expected):
    assert getattr(_bench_config(argv), field) == expected


def test_bench_gpu_on_a_machine_without_one_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", TINY, "--gpu", "0"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "cuda:0" in line and "no CUDA device" in line


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], "--batch-size 0"), (["--batch-size", "-1"], "--batch-size -1"),
    (["--image-size", "0"], "--image-size 0"), (["--threads", "0"], "--threads 0"),
    (["--iterations", "0"], "--iterations 0"), (["--jobs", "0"], "--jobs 0"), (["--min-time", "0"], "--min-time 0"),
    (["--min-time", "-1"], "--min-time -1"), (["--rounds", "0"], "--rounds 0"), (["--warmup", "-1"], "--warmup -1"),
    (["--opset", "99"], "opset 99"), (["--device", "gpu"], "unknown device 'gpu'"),
    (["--device", "tpu:0"], "device"), (["--out", "{tmp}/r.txt"], "unknown file type '.txt'"),
    (["--out", "{tmp}/r"], "unknown file type"), (["--plot", "{tmp}/p.json"], "--plot"),
    (["--out", "{tmp}/a_file/r.json"], "cannot write in"), (["--out", "{tmp}"], "unknown file type"),
    (["--device", "cpu", "--backend", "cuda-graphs"], "the cuda-graphs backend runs on cuda, not cpu"),
    (["--device", "cpu", "--backend", "tensorrt", "--amp", "fp16"], "the tensorrt backend runs on cuda, not cpu"),
])
def test_bench_bad_values_fail_in_one_line_before_any_work(argv, words, tmp_path, capsys, monkeypatch):
    import lowformer.bench.runner as runner
    monkeypatch.setattr(runner, "build_model", lambda *a, **k: pytest.fail("work started before the check"))
    (tmp_path / "a_file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["bench", TINY, "--iterations", "1", *argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lowformer bench: error:") and words in line


def test_bench_cpu_testrun_runs_and_the_written_files_replace_old_ones(tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old")
    assert main(["bench", TINY, "--cpu", "--testrun", "-b", "1", "--img-size", "32", "--iterations", "1",
                 "--warmup", "0", "--threads", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert (r["device_type"], r["mode"], r["batch_size"], r["image_size"]) == ("cpu", "throughput", 1, 32)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def _record(model, backend, threads, batch, median, noisy=False):
    return {"model": model, "backend": backend, "threads": threads, "batch_size": batch, "image_size": 224,
            "median_ms": median, "iqr_ms": median / 10, "noisy": noisy, "amp": "fp32", "job": None,
            "device": "cpu", "torch_version": torch.__version__, "images_per_s": batch * 1e3 / median, "macs": 1e9}


def test_plot_labels_every_backend_puts_batch_one_first_with_iqr_bars_and_noise():
    from matplotlib.container import ErrorbarContainer

    from lowformer.bench.results import plot_figure
    records = [_record(m, b, t, batch, 10.0 * batch * (1 + t), noisy=(b == "onnxruntime" and t == 2))
               for batch in (16, 1) for m in ("lowformer_b0", "lowformer_b1")
               for b in ("eager", "onnxruntime", "deploy") for t in (1, 2)]
    records.append(dict(_record("lowformer_b0", "eager", 1, 1, 5.0), job=0))  # a per-process row is left out
    fig = plot_figure(records)
    headline, throughput = fig.axes
    assert "batch 1 " in headline.get_title() and "batch 16" in throughput.get_title()
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        for backend in ("eager", "onnxruntime", "deploy"):
            assert f"{backend}, 1 thread" in labels and f"{backend}, 2 threads" in labels
        assert any("noisy" in label for label in labels)
        assert sum(isinstance(c, ErrorbarContainer) for c in ax.containers) == 6
        bars = [p for p in ax.patches if p.get_height() > 0]
        assert len(bars) == 12 and sum(bool(p.get_hatch()) for p in bars) == 2
    heights = sorted(p.get_height() for p in headline.patches)
    assert heights[0] == pytest.approx(20.0)  # ms per image at batch 1 (not the per-process 5 ms row)


def test_profile_flag_aliases_and_ranges(capsys):
    from lowformer.cli import build_parser
    args = build_parser().parse_args(["profile", TINY, "--image_size", "32", "--batch_size", "2", "--no_deploy",
                                      "--cpu"])
    assert (args.image_size, args.batch_size, args.deploy, args.device) == (32, 2, False, "cpu")
    for argv, words in ((["--image-size", "0"], "--image-size 0"), (["--iterations", "0"], "--iterations 0"),
                        (["--threads", "0"], "--threads 0"), (["--device", "gpu"], "unknown device")):
        assert main(["profile", TINY, *argv]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert words in line


def test_bench_onnxruntime_deploy_thread_sweep_on_the_command_line(tmp_path):
    out = tmp_path / "r.json"
    assert main(["bench", TINY, "--backend", "onnxruntime-deploy", "--threads", "1", "2", "-b", "1", "--image-size",
                 "32", "--iterations", "1", "--warmup", "0", "--onnx-cache", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["threads"], r["session_threads"]) for r in records] == [(1, 1), (2, 2)]
    assert all("/" not in r["onnx_file"] for r in records)
