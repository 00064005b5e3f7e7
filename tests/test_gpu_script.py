"""The prepared GPU run (benchmarks/gpu_cuda.sh) goes through its whole flow on the CPU (DEVICE=cpu), so the
script a GPU session runs at once is known to work up to its CUDA-only groups."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_every_group_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "BATCH": "2", "MIN_TIME": "0.05",
           "TRAIN_PER_CLASS": "13", "LOWFORMER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_cuda.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert "torch" in (out / "env.txt").read_text()
    expected = {"b2_fp32": ("fp32", {"eager", "channels_last"}),
                "b2_fp16": ("fp16", {"eager", "channels_last", "compile"}),
                "b2_bf16": ("bf16", {"channels_last"}),
                "b1_fp16": ("fp16", {"eager", "channels_last", "compile"}),
                "b2_onnxruntime": ("fp32", {"onnxruntime"})}
    for name, (amp, backends) in expected.items():
        rows = list(csv.DictReader((out / f"{name}.csv").open()))
        assert {(r["model"], r["backend"]) for r in rows} == {(m, b) for m in ("lowformer_b0", "lowformer_b1")
                                                              for b in backends}, name
        assert {r["amp"] for r in rows} == {amp} and {r["batch_size"] for r in rows} == {name.split("_")[0][1:]}
    summary = json.loads((out / "train_bf16.json").read_text())
    assert summary["finished"] and summary["global_batch"] == 128 and summary["images_per_s"] > 0
    assert not list(out.glob(".*"))  # the generated images and the training runs are removed


def test_only_runs_the_named_groups(tmp_path):
    """ONLY= reruns the groups a time limit cut short: the named bench group runs, no other and no training."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "BATCH": "2", "MIN_TIME": "0.05",
           "TRAIN_PER_CLASS": "1", "ONLY": "b2_fp32", "LOWFORMER_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_cuda.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b2_fp32.csv", "b2_fp32.log", "env.txt"]
    rows = list(csv.DictReader((tmp_path / "out" / "b2_fp32.csv").open()))
    assert {(r["model"], r["backend"]) for r in rows} == {(m, b) for m in ("lowformer_b0", "lowformer_b1")
                                                          for b in ("eager", "channels_last")}
