"""EdgeViT through the project's API reproduces the original (fixtures) from a checkpoint in the original
layout, and runs at input sizes the original's construction-time `img_size` ruled out."""
from __future__ import annotations

import pytest
import torch

import lowformer
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.edgevit import GlobalSparseAttn


@pytest.mark.parametrize("name,variant", [("edgevit_xs", "edgevit_xs"), ("edgevitxxs", "edgevit_xxs")])
def test_reproduces_original(name, variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "edgevit.pth")
    assert_reproduces_fixture(name, variant, path, ["stage1", "stage2", "stage3", "stage4"])


def test_params_of_the_unfixtured_variant():
    # EdgeViT-S as the paper reports it (13.1 M); built on the meta device, as `lowformer models` does
    with torch.device("meta"):
        model = lowformer.create_model("edgevit_s")
    assert sum(p.numel() for p in model.parameters()) == 13_108_168


def test_features_one_map_per_stride_at_any_size():
    model = lowformer.create_model("edgevit_xxs", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 256, 320))
    assert [tuple(m.shape) for m in maps] == [(1, 36, 64, 80), (1, 72, 32, 40), (1, 144, 16, 20), (1, 288, 8, 10)]


@pytest.mark.parametrize("size", [(250, 250), (200, 288)])
def test_sizes_the_original_rejects_run(size):
    # the sub-sampled attention's map no longer divides by r: the propagated grid is cropped back
    model = lowformer.create_model("edgevit_xxs", img_size=224).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_sparse_attention_samples_every_rth_pixel():
    """With r = 2 the unit reads only pixels at even rows and columns (the original's AvgPool2d(1, r)):
    changing the odd rows leaves its output unchanged, changing a sampled pixel does not."""
    torch.manual_seed(0)
    attn = GlobalSparseAttn(8, num_heads=2, sr_ratio=2).eval()
    x = torch.randn(1, 8, 6, 8)
    y = x.clone()
    y[:, :, 1::2, :] += 1.0  # odd rows are never sampled
    z = x.clone()
    z[:, :, 2, 4] += 1.0
    with torch.no_grad():
        assert torch.equal(attn(x), attn(y))
        assert not torch.allclose(attn(x), attn(z))


def test_drop_path_and_reset_classifier():
    model = lowformer.create_model("edgevit_xxs", drop_path_rate=0.2, num_classes=10)
    rates = [m.drop_prob for m in model.modules() if m.__class__.__name__ == "DropPath"]
    # one rate per block (local and global unit share it), rising linearly from 0 to 0.2 over 7 blocks
    assert rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 288)


def test_aliases_resolve():
    for alias, name in [("edgevitxxs", "edgevit_xxs"), ("edgevitxs", "edgevit_xs"), ("edgevits", "edgevit_s")]:
        assert lowformer.models.resolve_model_name(alias) == name
