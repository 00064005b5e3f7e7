"""EfficientMod through the project's API reproduces the vendored original (fixtures), with the original
checkpoint layout; any input size; the timm API (features, drop path, classifier reset); original names."""
from __future__ import annotations

import math

import pytest
import torch

import lowformer
from featured_fixture import assert_reproduces_fixture, write_original_checkpoint
from lowformer.models.featured.efficientmod import EfficientMod

TAPS = ("stage1", "stage2", "stage3", "stage4")


@pytest.mark.parametrize("variant", ["efficientmod_xxs", "efficientmod_xs"])
def test_reproduces_original(variant, tmp_path):
    path = write_original_checkpoint(variant, tmp_path / "checkpoint.pth")
    assert_reproduces_fixture(variant, variant, path, TAPS)


def test_odd_non_square_input_follows_the_strides():
    model = lowformer.create_model("efficientmod_xxs").eval()
    h, w = 97, 161
    with torch.no_grad():
        final, maps = model.forward_intermediates(torch.randn(1, 3, h, w))
        out = model.forward_head(final)
    sizes = [(math.ceil(h / 4 / 2 ** i), math.ceil(w / 4 / 2 ** i)) for i in range(4)]
    assert [tuple(m.shape[2:]) for m in maps] == sizes
    assert [m.shape[1] for m in maps] == [32, 64, 128, 256]
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_attention_heads_are_at_least_32_wide():
    with torch.device("meta"):
        model = lowformer.create_model("efficientmod_xxs")
    # stage 3 (width 128): 8 heads of 32 -> qkv 3 * 256; stage 4 (width 256): 8 heads of 32 -> 3 * 256
    assert model.stages[2].attn_blocks[0].attn.qkv.weight.shape == (768, 128)
    assert model.stages[3].attn_blocks[0].attn.proj.weight.shape == (256, 256)
    assert [len(s.blocks) for s in model.stages] == [2, 2, 6, 2]
    assert [len(s.attn_blocks) for s in model.stages] == [0, 0, 1, 2]


def test_drop_path_feature_info_and_classifier_reset():
    with torch.device("meta"):
        model = lowformer.create_model("efficientmod_xs", drop_path_rate=0.2)
        features = lowformer.create_model("efficientmod_xs", features_only=True)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    # one rate per block (attention blocks have two residuals), rising from 0 over the 18 blocks
    assert len(set(rates)) == 3 + 3 + 7 + 5 - 1 and rates == sorted(rates) and max(rates) == pytest.approx(0.2)
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [32, 64, 144, 288]
    model.reset_classifier(10)
    assert model.get_classifier().out_features == 10
    assert model(torch.zeros(1, 3, 64, 96, device="meta")).shape == (1, 10)


def test_original_names_resolve():
    for alias, name in {"efficientmodxxs": "efficientmod_xxs", "efficientmodxs": "efficientmod_xs",
                        "efficientmods": "efficientmod_s", "efficientmods_Conv": "efficientmod_s_conv"}.items():
        assert lowformer.models.resolve_model_name(alias) == name
    with torch.device("meta"):
        model = lowformer.create_model("efficientmodxs")
    assert isinstance(model, EfficientMod) and model.pretrained_cfg["architecture"] == "efficientmod_xs"


def test_params_and_macs_match_the_original():
    """The spec's count of the vendored original: 6.63 M params, 0.773 G MACs at 224."""
    from lowformer.bench import model_complexity
    info = model_complexity("efficientmodxs")
    assert info["params"] == 6_627_544 and info["image_size"] == 224
    assert round(info["macs"] / 1e9, 3) == 0.773
