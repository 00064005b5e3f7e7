"""Segmentation through the shared trainer: seg train / eval / predict, exact resume, bad input."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lowformer.cli import main

_FAST = ["--run_config.warmup_epochs", "0", "--data_provider.base_batch_size", "2", "--data_provider.n_worker", "0",
         "--segmentation.scale", "[64,64]", "--segmentation.crop", "[64,64]", "--segmentation.test_scale", "[64,64]",
         "--segmentation.dice_weight", "0.5", "--no-progress"]


def _dataset(root, n_train: int = 4, n_val: int = 2) -> None:
    """Squares of one of three classes on a noisy background; label = the square's class (0 = background)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 60, (72, 88, 3), dtype=np.uint8)
            mask = np.zeros((72, 88), np.uint8)
            c = 1 + i % 3
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            image[y:y + 36, x:x + 40, c - 1] = 230
            mask[y:y + 36, x:x + 40] = c
            Image.fromarray(image).save(root / "images" / split / f"{split}_{i}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"{split}_{i}.png")


def _train(data, run, *extra: str) -> int:
    return main(["seg", "train", "configs/seg/composite/fpn_b0.yaml", "--data_provider.data_dir", str(data),
                 "--path", str(run), "--segmentation.num_classes", "4", "--segmentation.class_names", "[]",
                 "--segmentation.paste_source", "null", *_FAST, *extra])


def test_train_eval_predict(tmp_path, capsys) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    _dataset(data)
    assert _train(data, run, "--run_config.n_epochs", "1") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "segmentation" and summary["finished"]
    out = tmp_path / "scores.json"
    assert main(["seg", "eval", "--run", str(run), "--data", str(data), "--split", "val", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["images"] == 2 and 0 <= scores["miou"] <= 100 and len(scores["per_class_iou"]) == 4
    # the trainer's validation of the same weights gives the same mIoU
    assert scores["miou"] == pytest.approx(summary["best_miou"])
    recipe_flip = yaml.safe_load((run / "config.yaml").read_text())["segmentation"]["test_flip"]
    assert scores["test_flip"] is recipe_flip
    for flag, expected in (("--flip", True), ("--no-flip", False)):
        other = tmp_path / f"{flag}.json"
        assert main(["seg", "eval", "--run", str(run), "--data", str(data), flag, "--out", str(other)]) == 0
        assert json.loads(other.read_text())["test_flip"] is expected
    overlay = tmp_path / "overlay.png"
    image = data / "images" / "val" / "val_0.jpg"
    assert main(["seg", "predict", str(image), "--run", str(run), "--out", str(overlay)]) == 0
    with Image.open(overlay) as o, Image.open(image) as i:
        assert o.size == i.size and o.mode == "RGB"


def _paste_source(root) -> list[str]:
    """Two classes of solid-colour photos, and the overrides that paste them."""
    for name in ("red", "blue"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / name / f"{i}.png")
    return ["--segmentation.class_names", "[background, red, green, blue]", "--segmentation.paste_source", str(root),
            "--segmentation.paste_size", "[10,20]"]


@pytest.mark.parametrize("paste", [False, True], ids=["plain", "copy_paste"])
def test_resume_equals_uninterrupted(tmp_path, paste: bool) -> None:
    data = tmp_path / "data"
    _dataset(data)
    extra = ["--run_config.n_epochs", "2", *(_paste_source(tmp_path / "src") if paste else [])]
    assert _train(data, tmp_path / "full", *extra) == 0
    assert _train(data, tmp_path / "cut", *extra, "--stop-after-epochs", "1") == 0
    assert _train(data, tmp_path / "cut", *extra, "--resume") == 0
    a = torch.load(tmp_path / "full" / "checkpoint" / "evalmodel_final.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint" / "evalmodel_final.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (tmp_path / "full" / "metrics.csv").read_text().splitlines()
    rows_b = (tmp_path / "cut" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[2] for r in rows_a] == [r.split(",")[2] for r in rows_b]  # train loss per epoch


def test_copy_paste_from_a_classification_folder(tmp_path, capsys, caplog) -> None:
    data, src = tmp_path / "data", tmp_path / "src"
    _dataset(data)
    overrides = _paste_source(src)
    names, paste = overrides[:2], overrides[2:]
    with caplog.at_level(logging.INFO):
        assert _train(data, tmp_path / "run", "--run_config.n_epochs", "1", *names, *paste) == 0
    assert f"pasting 0-3 of the 6 photos in {src} per image" in caplog.text
    # without class names the folders cannot be matched: one line, before any work
    assert _train(data, tmp_path / "bad", "--run_config.n_epochs", "1", *paste) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "segmentation.paste_source" in err[0] and "class_names" in err[0]
    assert _train(data, tmp_path / "bad", *names[:1], "[background, red, green, cyan]", *paste) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "folder(s) blue name no class" in err[0]
    assert not (tmp_path / "bad" / "checkpoint").exists()


def test_bad_input_is_one_line(tmp_path, capsys) -> None:
    data = tmp_path / "data"
    _dataset(data)
    Image.fromarray(np.full((72, 88), 9, np.uint8)).save(data / "annotations" / "train" / "train_0.png")
    assert _train(data, tmp_path / "run", "--run_config.n_epochs", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "values [9]" in err[0] and "train_0.png" in err[0]
    assert main(["seg", "train", "configs/cls/cifar10/b0.yaml", "--path", str(tmp_path / "x")]) == 2
    assert "task: segmentation" in capsys.readouterr().err
    assert main(["seg", "eval", "--run", str(tmp_path / "none"), "--data", str(data)]) == 2
    capsys.readouterr()
    Image.fromarray(np.zeros((72, 88), np.uint8)).save(data / "annotations" / "train" / "train_0.png")
    # data_provider.dataset names what the folder must be: a task that reads other data, or another layout
    assert _train(data, tmp_path / "run", "--data_provider.dataset", "imagenet") == 2
    assert "the segmentation task reads ade20k, voc, composite, not 'imagenet'" in capsys.readouterr().err
    assert _train(data, tmp_path / "run", "--data_provider.dataset", "voc") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "voc comes in voc layout" in err[0] and "is in ade20k layout" in err[0]
    assert not (tmp_path / "run" / "checkpoint").exists()


@pytest.mark.parametrize("recipe", ["composite/fpn_b0", "ade20k/upernet_dwnet_tiny", "ade20k/fpn_lowformer_b0",
                                    "voc/deeplabv3_edgeformer_s"])
def test_shipped_recipes_load(recipe: str) -> None:
    import lowformer.segmentation.task  # noqa: F401  (registers the section)
    from lowformer.train import load_config
    cfg = load_config(f"configs/seg/{recipe}.yaml")
    sc = cfg.section("segmentation")
    assert cfg.task == "segmentation" and sc.num_classes in (11, 150, 21)
    assert not sc.class_names or len(sc.class_names) == sc.num_classes
