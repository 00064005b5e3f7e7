"""`lowformer det train` under torchrun: two gloo ranks on a handful of composite images, stopped and resumed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from lowformer.checkpoints import read_checkpoint
from torchrun import run_torchrun

COMPOSITE = Path(__file__).parents[1].parent / "shared" / "data" / "composite"
if not COMPOSITE.is_dir():
    COMPOSITE = Path("/work/shared/data/composite")


def _subset(root: Path, split: str, n: int) -> None:
    """The first ``n`` images of ``split`` with their annotations, in the composite layout."""
    ann = json.loads((COMPOSITE / "annotations" / f"instances_{split}.json").read_text())
    images = ann["images"][:n]
    ids = {im["id"] for im in images}
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    for im in images:
        shutil.copy(COMPOSITE / "images" / split / im["file_name"], root / "images" / split / im["file_name"])
    ann = {**ann, "images": images, "annotations": [a for a in ann["annotations"] if a["image_id"] in ids]}
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))


TINY = {
    "task": "detection",
    "data_provider": {"base_batch_size": 2, "n_worker": 0, "drop_last": True},
    "run_config": {"n_epochs": 2, "warmup_epochs": 0, "base_lr": 1e-3, "optimizer_name": "adamw",
                   "weight_decay": 0.0, "grad_clip": 10.0, "reset_bn": False},
    "net_config": {"name": "test_efficientnet"},
    "ema_decay": 0.9,
    "detection": {"arch": "retinanet", "train_min_size": 64, "train_max_size": 64, "square": True,
                  "eval_batch_size": 2,
                  "settings": {"strides": [8, 16, 32], "extra_levels": 0, "fpn_channels": 32, "head_convs": 1,
                               "head_norm": "group", "min_size": 64, "max_size": 64, "anchor_scale": 3.0}},
}


def test_two_rank_detection_training_stops_resumes_and_keeps_ranks_equal(tmp_path):
    data = tmp_path / "data"
    _subset(data, "train", 8)
    _subset(data, "val", 2)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "data_provider": {**TINY["data_provider"], "data_dir": str(data)}}))
    run = tmp_path / "run"
    first = run_torchrun(["det", "train", str(config), "--path", str(run), "--no-progress", "--stop-after-epochs", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_checkpoint(run / "checkpoint" / "checkpoint.pt")["epoch"] == 0
    second = run_torchrun(["det", "train", str(config), "--path", str(run), "--no-progress", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    # 8 images / (2 ranks x 2) = 2 steps an epoch; after the resume the ranks still hold the same weights
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["rank_param_max_diff"] == 0.0
    assert read_checkpoint(run / "checkpoint" / "checkpoint.pt")["epoch"] == 1
    # one run, written by rank 0: no per-rank checkpoints
    names = {p.name for p in (run / "checkpoint").iterdir()}
    assert {"checkpoint.pt", "evalmodel.pt"} <= names and not any("rank" in n for n in names)
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + one row per epoch, the first epoch's row kept across the resume
