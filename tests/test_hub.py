"""Runs as timm models: eval --run, predict, the timm/Hugging Face folder export, hf-hub:/local-dir: names
and timm's published weights for pretrained=True (from an offline Hugging Face cache built here)."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torchvision.transforms import v2

import lowformer
from lowformer.checkpoints import to_original_layout
from lowformer.cli import main
from lowformer.data import bundled_image
from lowformer.hub import class_names, load_run, read_run, save_pretrained
from lowformer.train import load_config
from lowformer.train.config import config_to_dict

CIFAR = Path(str(resources.files("lowformer") / "assets" / "cifar10-mini"))
CLASSES = sorted(p.name for p in (CIFAR / "train").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory as `lowformer train` leaves it: its config.yaml (the trainer's own serialisation of
    the CIFAR-10 recipe at 48 px, bilinear, crop 1.0) and the EMA weights in the original layout."""
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/cls/cifar10/b0.yaml", {"data_provider": {"data_dir": str(CIFAR)}})
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    torch.manual_seed(0)
    model = lowformer.create_model("lowformer_b0", num_classes=10).eval()
    (run / "checkpoint").mkdir()
    torch.save(to_original_layout(model.state_dict(), model), run / "checkpoint" / "evalmodel.pt")
    torch.save(model.state_dict(), run / "native.pt")
    return run


def _reference_top1(run: Path) -> float:
    """Top-1 with a hand-written torchvision pipeline of the recipe's validation transform."""
    model = lowformer.create_model("lowformer_b0", num_classes=10, checkpoint_path=run / "native.pt").eval()
    transform = v2.Compose([v2.ToImage(), v2.Resize(48, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
                            v2.CenterCrop(48), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    correct = total = 0
    with torch.inference_mode():
        for label, name in enumerate(CLASSES):
            files = sorted((CIFAR / "val" / name).iterdir())
            x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
            correct += (model(x).argmax(-1) == label).sum().item()
            total += len(files)
    return 100.0 * correct / total


def test_read_run_takes_the_recipe(run_dir):
    recipe = read_run(run_dir)
    assert (recipe.model, recipe.image_size, recipe.crop_pct, recipe.interpolation) == ("lowformer_b0", 48, 1.0, "bilinear")
    assert recipe.classes == tuple(CLASSES) and recipe.weights == run_dir / "checkpoint" / "evalmodel.pt"


def test_eval_run_uses_the_runs_model_classes_and_preprocessing(run_dir, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["eval", "--run", str(run_dir), "-j", "0", "--device", "cpu", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    header, row = out.read_text().splitlines()
    result = dict(zip(header.split(","), row.split(",")))
    assert result["images"] == "100" and result["image_size"] == "48" and result["interpolation"] == "bilinear"
    assert float(result["top1"]) == pytest.approx(_reference_top1(run_dir))
    assert int(result["params"]) == sum(p.numel() for p in load_run(run_dir).parameters())
    assert float(result["images_per_s"]) > 0 and float(result["ms_per_image"]) > 0
    assert f"Top1 Acc={float(result['top1']):.1f} %" in text and "images/s" in text and "ms per image" in text


def test_hf_export_of_a_run_reloads_through_timm_with_identical_outputs(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--run", str(run_dir), "--format", "hf", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "lowformer_b0" and config["label_names"] == CLASSES
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert reloaded.pretrained_cfg["input_size"] == (3, 48, 48) and reloaded.pretrained_cfg["crop_pct"] == 1.0
    assert reloaded.pretrained_cfg["interpolation"] == "bilinear" and class_names(reloaded) == CLASSES
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), load_run(run_dir)(x), rtol=0, atol=0)
    # lowformer.create_model and the commands take the same name.
    ours = lowformer.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), reloaded(x), rtol=0, atol=0)


def test_hf_export_never_replaces_a_users_folder(run_dir, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(lowformer.LowformerError, match="not an empty folder"):
        save_pretrained(run_dir, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_predict_names_the_runs_classes(run_dir, capsys):
    image = CIFAR / "val" / "cat" / sorted(p.name for p in (CIFAR / "val" / "cat").iterdir())[0]
    assert main(["predict", "--run", str(run_dir), str(image), "--topk", "10", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)[0]
    assert sorted(t["name"] for t in record["top"]) == CLASSES
    assert sum(t["probability"] for t in record["top"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_prints_imagenet_names_for_a_1000_class_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet").eval()
    with torch.no_grad():  # make class 0 (tench) win on any input
        model.classifier.bias.zero_()
        model.classifier.bias[0] = 50.0
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert main(["predict", "test_efficientnet", str(bundled_image()), "--checkpoint", str(tmp_path / "w.pt"),
                 "--topk", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(bundled_image()) and lines[1].split()[-2:] == ["0", "tench"]


def test_predict_refuses_a_missing_image_before_building_the_model(capsys):
    assert main(["predict", "no_such_model", "missing.jpg"]) == 2
    assert "missing.jpg" in capsys.readouterr().err


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding timm's `test_efficientnet.r160_in1k` as timm publishes it
    (config.json + model.safetensors), with seeded weights; the weights folder is empty."""
    cache = tmp_path / "hf"
    repo = cache / "models--timm--test_efficientnet.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    torch.manual_seed(1)
    model = timm.create_model("test_efficientnet").eval()
    save_pretrained(model, repo / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("LOWFORMER_WEIGHTS", str(tmp_path / "weights"))
    return model


def test_pretrained_uses_timms_published_weights_when_the_folder_lacks_them(offline_hf_cache):
    x = torch.randn(1, 3, 160, 160)
    model = lowformer.create_model("test_efficientnet", pretrained=True).eval()
    hub = lowformer.create_model("hf-hub:timm/test_efficientnet.r160_in1k", pretrained=True).eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), offline_hf_cache(x), rtol=0, atol=0)
        torch.testing.assert_close(hub(x), offline_hf_cache(x), rtol=0, atol=0)


def test_local_weights_folder_comes_first(offline_hf_cache, tmp_path):
    torch.manual_seed(2)
    local = timm.create_model("test_efficientnet").eval()
    (tmp_path / "weights").mkdir()
    save_file(local.state_dict(), tmp_path / "weights" / "test_efficientnet.safetensors")
    model = lowformer.create_model("test_efficientnet", pretrained=True).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), local(x), rtol=0, atol=0)


def test_published_weights_missing_from_an_offline_cache_is_one_line(offline_hf_cache, tmp_path):
    with pytest.raises(lowformer.CheckpointError) as e:
        lowformer.create_model("test_resnet", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "test_resnet" in msg and "HF_HUB_OFFLINE" in msg
    assert str(tmp_path / "weights" / "test_resnet") in msg


def test_local_dir_without_config_is_named(tmp_path):
    with pytest.raises(lowformer.LowformerError, match="no config.json"):
        lowformer.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_timms_own_loaders_read_evalmodel_with_the_family_filter(run_dir):
    """evalmodel.pt keeps the original layout; both ways the README gives load it into timm's model."""
    import timm.models.lowformer as timm_lowformer
    ours = load_run(run_dir)
    path = str(run_dir / "checkpoint" / "evalmodel.pt")
    by_loader = timm.create_model("lowformer_b0", num_classes=10).eval()
    timm.models.load_checkpoint(by_loader, path, filter_fn=timm_lowformer.checkpoint_filter_fn)
    by_overlay = timm.create_model("lowformer_b0", num_classes=10, pretrained=True,
                                   pretrained_cfg_overlay=dict(file=path, num_classes=10)).eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode():
        torch.testing.assert_close(by_loader(x), ours(x), rtol=0, atol=0)
        torch.testing.assert_close(by_overlay(x), ours(x), rtol=0, atol=0)


def test_exported_folder_evaluates_like_the_run(run_dir, tmp_path):
    """`local-dir:` works as a command's model name and carries the run's preprocessing and classes."""
    out = tmp_path / "hf"
    save_pretrained(run_dir, out)
    common = ["-j", "0", "--device", "cpu", "--no-progress"]
    assert main(["eval", "--run", str(run_dir), *common, "--out", str(tmp_path / "run.json")]) == 0
    assert main(["eval", f"local-dir:{out}", "--pretrained", "--data", str(CIFAR / "val"), *common,
                 "--out", str(tmp_path / "hf.json")]) == 0
    run, hf = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "hf"))
    assert (hf["top1"], hf["top5"], hf["image_size"]) == (run["top1"], run["top5"], 48)


def test_hf_export_of_a_model_and_checkpoint(tmp_path, capsys):
    torch.manual_seed(3)
    model = timm.create_model("test_efficientnet").eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    out = tmp_path / "hf"
    assert main(["export", "test_efficientnet", "--checkpoint", str(tmp_path / "w.pt"), "--format", "hf",
                 "--out", str(out)]) == 0
    reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    assert reloaded.pretrained_cfg["input_size"] == model.pretrained_cfg["input_size"]
