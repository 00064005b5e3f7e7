"""Evaluation: metrics over an image folder, class maps into the 1000-class index, the command line."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.nn as nn

from lowformer import LowformerError, imagenet_eval
from lowformer.cli import main
from lowformer.data import bundled_image


class FixedClass(nn.Module):
    """Predicts class ``index`` first, ``index + 1`` second, then the highest class indices."""

    def __init__(self, index: int, num_classes: int = 1000) -> None:
        super().__init__()
        self.index, self.num_classes = index, num_classes
        self.pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear",
                                   mean=(0.5,) * 3, std=(0.5,) * 3, architecture="fixed")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (torch.arange(self.num_classes) / self.num_classes - 1.0).expand(len(x), -1).clone()
        out[:, self.index], out[:, self.index + 1] = 2.0, 1.0
        return out


@pytest.fixture
def wnid_folder(tmp_path):
    """Two ImageNet classes with index 0 (tench, 1 image) and 5 (2 images), plus the tsv class map."""
    for wnid, n in (("n01440764", 1), ("n01496331", 2)):
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(n):
            shutil.copy(bundled_image(), tmp_path / "val" / wnid / f"{i}.JPEG")
    (tmp_path / "classes.tsv").write_text("index\twnid\tname\n0\tn01440764\ttench\n1\tn01443537\tgoldfish\n"
                                          "5\tn01496331\telectric_ray\n")
    return tmp_path


def test_class_map_scores_folders_in_the_full_index(wnid_folder):
    tsv = wnid_folder / "classes.tsv"
    hit5 = imagenet_eval(FixedClass(5), wnid_folder / "val", class_map=tsv, workers=0, progress=False)
    assert hit5["images"] == 3 and hit5["top1"] == pytest.approx(200 / 3) and hit5["top5"] == pytest.approx(200 / 3)
    hit4 = imagenet_eval(FixedClass(4), wnid_folder / "val", class_map=tsv, workers=0, progress=False)
    assert hit4["top1"] == 0.0 and hit4["top5"] == pytest.approx(200 / 3)  # class 5 is its second guess
    # Without the map, the folders are classes 0 and 1 in sorted order.
    plain = imagenet_eval(FixedClass(0), wnid_folder / "val", workers=0, progress=False)
    assert plain["top1"] == pytest.approx(100 / 3) and plain["top5"] == 100.0
    assert (plain["image_size"], plain["crop_ratio"], plain["interpolation"]) == (32, 1.0, "bilinear")


def test_folder_missing_from_the_class_map_is_named(wnid_folder):
    (wnid_folder / "val" / "n99999999").mkdir()
    shutil.copy(bundled_image(), wnid_folder / "val" / "n99999999" / "x.JPEG")
    with pytest.raises(LowformerError, match="not in the class map .*n99999999"):
        imagenet_eval(FixedClass(0), wnid_folder / "val", class_map=wnid_folder / "classes.tsv", workers=0)


def test_cli_eval_writes_the_metrics(wnid_folder, capsys):
    out = wnid_folder / "m.json"
    assert main(["eval", "test_efficientnet", "--data", str(wnid_folder / "val"), "--class-map",
                 str(wnid_folder / "classes.tsv"), "--image-size", "32", "--crop-ratio", "0.875", "--workers", "0",
                 "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 3 and result["image_size"] == 32 and result["crop_ratio"] == 0.875
    assert {"top1", "top5", "model"} <= set(result) and result["model"] == "test_efficientnet"
    assert f"Top1 Acc={result['top1']:.1f} %" in capsys.readouterr().out


def test_eval_prints_percentages_and_throughput(wnid_folder, capsys):
    assert main(["eval", "test_efficientnet", "--data", str(wnid_folder / "val"), "--class-map",
                 str(wnid_folder / "classes.tsv"), "--image_size", "32", "-j", "0", "-b", "2", "--device", "cpu",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Top1 Acc=\d+\.\d %, Top5 Acc=\d+\.\d %", out)
    assert re.search(r"[\d.]+ images/s, [\d.]+ ms per image", out) and "M params" in out


def test_amp_scores_the_same_and_reports_its_dtype(wnid_folder):
    tsv = wnid_folder / "classes.tsv"
    plain = imagenet_eval(FixedClass(5), wnid_folder / "val", class_map=tsv, workers=0, progress=False)
    amp = imagenet_eval(FixedClass(5), wnid_folder / "val", class_map=tsv, workers=0, progress=False, amp=True)
    assert amp["top1"] == plain["top1"] == pytest.approx(200 / 3) and (amp["amp"], plain["amp"]) == ("bfloat16", None)
    assert amp["images_per_s"] > 0 and amp["ms_per_image"] == pytest.approx(1000 / amp["images_per_s"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=0), "image size"), (dict(crop_ratio=0.0), "crop ratio"), (dict(batch_size=0), "batch size"),
    (dict(workers=-1), "workers"), (dict(num_classes=0), "num_classes"), (dict(device="gpu7"), "device"),
    (dict(interpolation="cubic"), "interpolation"),
])
def test_zero_is_a_value_not_the_default(wnid_folder, kwargs, match):
    with pytest.raises(LowformerError, match=match):
        imagenet_eval("test_efficientnet", wnid_folder / "val", progress=False, **kwargs)


def test_a_folder_of_unreadable_images_fails(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(LowformerError, match="none of the 2 image"):
        imagenet_eval(FixedClass(0), tmp_path, workers=0, progress=False)
    assert main(["eval", "test_efficientnet", "--data", str(tmp_path), "-j", "0", "--device", "cpu"]) == 2
    assert "could be read" in capsys.readouterr().err


def test_output_path_is_checked_before_any_work(wnid_folder, tmp_path, capsys):
    # The model name is not even looked up: the bad --out is reported first.
    for out, match in ((tmp_path / "missing" / "r.json", "does not exist"), (tmp_path / "r.txt", ".json or .csv")):
        assert main(["eval", "no_such_model", "--data", str(wnid_folder / "val"), "--out", str(out)]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "r.txt").exists()


def test_csv_and_json_results_hold_the_same_record(wnid_folder, tmp_path):
    args = ["eval", "test_efficientnet", "--data", str(wnid_folder / "val"), "--class-map",
            str(wnid_folder / "classes.tsv"), "--img-size", "32", "-j", "0", "--device", "cpu", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "r.json")]) == 0
    assert main(args + ["--out", str(tmp_path / "r.csv")]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    header, row = (tmp_path / "r.csv").read_text().splitlines()
    assert header.split(",") == list(record) and record["images"] == 3 and record["params"] > 0
    assert dict(zip(header.split(","), row.split(",")))["top1"] == str(record["top1"])
