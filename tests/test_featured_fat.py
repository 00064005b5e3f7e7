"""FAT through the project's API reproduces the original (fixtures) from a checkpoint in the original
layout; its feature taps say where FAT really downsamples (inside the last block of stages 1-3)."""
from __future__ import annotations

import pytest
import torch

import lowformer
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint


@pytest.mark.parametrize("name,variant", [("fat_b0", "fat_b0"), ("FATb1", "fat_b1")])
def test_reproduces_original(name, variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "fat.pth")
    assert_reproduces_fixture(name, variant, path, ["stem", "stage1", "stage2", "stage3", "stage4"])


def test_params_of_the_unfixtured_variants():
    # the paper's B2 (13.5 M) and B3 (29.2 M), built on the meta device, as `lowformer models` does
    with torch.device("meta"):
        params = [sum(p.numel() for p in lowformer.create_model(n).parameters()) for n in ("fat_b2", "fat_b3")]
    assert params == [13_466_728, 29_196_264]


def test_feature_info_lists_every_tap_and_features_take_one_per_stride():
    torch.manual_seed(0)
    model = lowformer.create_model("fat_b0")
    assert [(f["module"], f["reduction"]) for f in model.feature_info] == [
        ("stem", 4), ("stages.0", 8), ("stages.1", 16), ("stages.2", 32), ("stages.3", 32)]
    torch.manual_seed(0)  # the same initial weights as `model`
    features = lowformer.create_model("fat_b0", features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, 97, 130)  # odd and non-square: every stride-2 conv rounds up
    with torch.no_grad():
        maps = features(x)
        _, taps = model.eval().forward_intermediates(x)
    assert [tuple(m.shape) for m in maps] == [(1, 32, 25, 33), (1, 80, 13, 17), (1, 160, 7, 9), (1, 256, 4, 5)]
    # the stride-32 map is the last stage's (the richer one), not the downsampling stage 3
    torch.testing.assert_close(maps[-1], taps[4])


def test_drop_path_and_reset_classifier():
    model = lowformer.create_model("fat_b0", drop_path_rate=0.1, num_classes=10)
    rates = [m.drop_prob for m in model.modules() if m.__class__.__name__ == "DropPath"]
    assert len(rates) == 11 and rates[-1] == pytest.approx(0.1)  # 12 blocks, the first at rate 0 has none
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)


def test_aliases_resolve():
    for alias in ("FATb0", "fatb0"):
        assert lowformer.models.resolve_model_name(alias) == "fat_b0"
    assert lowformer.models.resolve_model_name("FATb3") == "fat_b3"
