"""``lowformer bench`` and ``lowformer profile`` on the command line: the original's flag spellings, outputs."""
from __future__ import annotations

import csv
import json

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
